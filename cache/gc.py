"""Garbage collection with an explicit scope (DVC's habit): what the catalog reaches stays.

Reached: the output and the working folder of every run (checkpoints of an interrupted training,
the best-heldout and snapshot weights of a finished one), artifacts named by the catalog's
current tables, and the clips of current frame indexes. Everything else the store wrote under
artifacts/ and runs/ goes: files named as the store names them (a digest in its two-character
folder, a run's weights, checkpoint and plots, an interrupted write's temporary); any other file
there is left and reported, never deleted. In a run folder that stays, the temporaries of an
interrupted write go, and checkpoints set aside (damaged, or replaced by --force) once the run is done. A target is one configuration and repeat (a training's target names its configuration,
seed and split), so with `superseded` only the runs a later completed run of the same target
replaced go (new code, new input contents), and are listed by name; training, evaluation and
features runs registered before targets named their configuration are never counted as superseded
(their targets then shared one name across configurations). With `failed`, failed runs
are marked `cleared`: `status` stops reporting them (the rows stay, as history).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cache.catalog import Catalog
from cache.store import TMP_PREFIX, Store


_DIGEST_NAME = re.compile(r"([0-9a-f]{64})(\.[A-Za-z0-9]+)*")
_RUN_FOLDER = re.compile(r"[0-9a-f]{16}")
_RUN_FILE = re.compile(r"checkpoint\.pt|(best|last|weights|epoch_\d+)\.safetensors|(curves|confusion)\.png")
_SET_ASIDE = re.compile(r"checkpoint\.pt\.set-aside-\d+")


@dataclass
class Report:
    files: int = 0
    bytes: int = 0
    rows: int = 0
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path under the home, why it goes) of leftovers
    foreign: list[str] = field(default_factory=list)  # paths under artifacts/ or runs/ the store did not write
    superseded: list[tuple[str, str]] = field(default_factory=list)  # (target, run key) dropped
    cleared: list[tuple[str, str]] = field(default_factory=list)  # (target, run key) of failed runs forgotten


def collect(catalog: Catalog, store: Store, superseded: bool, dry_run: bool, failed: bool = False) -> Report:
    with catalog.transaction() as con:
        scope = "" if not superseded else """
            AND (status <> 'done' OR (configuration IS NULL AND stage IN ('train', 'evaluate', 'features'))
                 OR started_at = (SELECT max(started_at) FROM runs r2
                 WHERE r2.target = runs.target AND r2.status = 'done'))"""
        cleared = con.execute("SELECT target, key FROM runs WHERE status = 'failed' ORDER BY target, started_at"
                              ).fetchall() if failed else []
        if cleared and not dry_run:
            con.execute("UPDATE runs SET status = 'cleared' WHERE status = 'failed'")
        dropped = con.execute(f"""SELECT target, key FROM runs WHERE NOT (true {scope})
                                  ORDER BY target, started_at""").fetchall()
        outputs = {d for (d,) in con.execute(f"SELECT output FROM runs WHERE output IS NOT NULL {scope}").fetchall()}
        outputs |= {d for (d,) in con.execute("""
            SELECT artifact FROM text_embedding_files UNION SELECT artifact FROM video_embedding_files
            UNION SELECT artifact FROM frame_index
            UNION SELECT checkpoint_digest FROM results WHERE checkpoint_digest IS NOT NULL""").fetchall()}
        artifacts = con.execute("SELECT digest, path FROM artifacts").fetchall()
        keep_paths = {p for d, p in artifacts if d in outputs}
        drop_digests = [d for d, _ in artifacts if d not in outputs]
        clips = con.execute("""SELECT entry_key, path, entry_key IN (SELECT entry_key FROM frame_index)
                               FROM frame_clips""").fetchall()
        keep_paths |= {p for _, p, used in clips if used}
        drop_clips = [k for k, _, used in clips if not used]
        run_keys = {k[:16] for (k,) in con.execute(f"SELECT key FROM runs WHERE true {scope}").fetchall()}
        if not dry_run:
            for d in drop_digests:
                con.execute("DELETE FROM artifacts WHERE digest = ?", [d])
            for k in drop_clips:
                con.execute("DELETE FROM frame_clips WHERE entry_key = ?", [k])
        done = {k[:16] for (k,) in con.execute("SELECT key FROM runs WHERE status = 'done'").fetchall()}
    report = Report(rows=len(drop_digests) + len(drop_clips), superseded=dropped, cleared=cleared)
    if store.artifacts.exists():
        from tqdm import tqdm

        # 240k clips take a while to walk: a bar on a terminal
        walk = tqdm(store.artifacts.rglob("*"), desc="gc", unit="file", leave=False, disable=not sys.stderr.isatty())
        for path in walk:
            if not path.is_file() or path.is_symlink():
                continue
            if path.name.startswith(TMP_PREFIX):
                _remove(store, path, report, dry_run)
            elif not _store_named(path):
                report.foreign.append(store.relative(path))
            elif store.relative(path) not in keep_paths:
                _remove(store, path, report, dry_run)
    runs_dir = store.home / "runs"
    if runs_dir.exists():
        for folder in sorted(runs_dir.iterdir()):
            if not folder.is_dir() or folder.is_symlink() or not _RUN_FOLDER.fullmatch(folder.name):
                report.foreign.append(store.relative(folder))
                continue
            reached = folder.name in run_keys
            for path in sorted(folder.rglob("*")):
                if not path.is_file() or path.is_symlink():
                    continue
                top = path.parent == folder
                if path.name.startswith(TMP_PREFIX):
                    report.notes.append((store.relative(path), "the temporary of an interrupted write"))
                    _remove(store, path, report, dry_run)
                elif top and _SET_ASIDE.fullmatch(path.name):
                    if not reached or folder.name in done:  # else its interrupted run may still want it
                        report.notes.append((store.relative(path), "a checkpoint set aside (damaged, or "
                                                                   "replaced by --force); its run is done or gone"))
                        _remove(store, path, report, dry_run)
                elif top and _RUN_FILE.fullmatch(path.name):
                    if not reached:
                        _remove(store, path, report, dry_run)
                else:
                    report.foreign.append(store.relative(path))
            if not reached and not dry_run and not any(folder.iterdir()):
                folder.rmdir()
    return report


def _store_named(path: Path) -> bool:
    """Named as Store.artifact_path names a file: artifacts/KIND/ab/abcd...(.ext)."""
    m = _DIGEST_NAME.fullmatch(path.name)
    return m is not None and path.parent.name == m.group(1)[:2]


def _remove(store: Store, path: Path, report: Report, dry_run: bool) -> None:
    report.files += 1
    report.bytes += path.stat().st_size
    if not dry_run:
        path.unlink()
