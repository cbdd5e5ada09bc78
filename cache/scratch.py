"""Scratch folders in the system's temporary directory that a kill -9 does not leak.

`sql` copies the catalog into one (at Kinetics size, tens of MB a query) and `gc` spills its kept
paths into one. A killed process cannot remove its folder, so each folder holds a file its process
keeps flock-ed while it lives; the next process to make a folder of the same kind removes those
whose lock it can take: their owner is gone, and the kernel released the lock with it. A folder
without that file (being made, left by an older msta-pipe, or on a filesystem without flock), a
link, or another user's folder is never touched.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OWNER = ".owner"
_UNLOCKED = ".owner-new"  # the owner file until it is locked


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A new folder `<tmp>/<prefix>XXXX`, removed on exit; orphans of the same prefix removed first."""
    root = Path(tempfile.gettempdir())
    remove_orphans(root, prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        # Locked under another name, then renamed: a sweeper never sees an owner file not yet locked.
        fd = os.open(folder / _UNLOCKED, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.rename(folder / _UNLOCKED, folder / OWNER)
            except OSError:  # a filesystem without flock: the folder works, unswept if killed
                pass
            yield folder
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphans(root: Path, prefix: str) -> list[Path]:
    """Remove the folders `root/<prefix>*` of this user whose owner file is not locked; return them."""
    removed = []
    for folder in root.glob(f"{prefix}*"):
        try:
            st = folder.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():  # a link, a file, another user's
                continue
            fd = os.open(folder / OWNER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # no owner file: being made, or not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its process is alive (or the filesystem has no flock)
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed
