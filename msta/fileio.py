"""Files written whole or not at all, and their digests: the one implementation, used by the model
package (checkpoints, adapters, cached clips), the synthetic world and the store under cache/.
It imports nothing of the project, so that `msta/` stays usable on its own and `cache/` may build on it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_PREFIX = ".tmp-"  # what `gc` recognises as the leftover of an interrupted write
_CHUNK = 1 << 20


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, rename, fsync the
    folder: readers never see a partial file, and the rename survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write() on a full disk names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def safetensors_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a safetensors file's logical content: tensors by name, and metadata, in sorted order.

    The file bytes are not a stable identity: the writer stores the metadata map in hash order,
    which differs from one process to the next.
    """
    import json

    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
