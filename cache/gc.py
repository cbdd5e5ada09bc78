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

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from cache.catalog import Catalog
from cache.scratch import scratch_dir
from cache.store import TMP_PREFIX, Store
from cache.views import index_files, quoted

if TYPE_CHECKING:
    import duckdb


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
    unreadable_indexes: list[str] = field(default_factory=list)  # targets whose index cannot be read: every clip stays


# What the catalog reaches: the outputs of kept runs and of current tables, and current indexes' clips.
_OUTPUTS = """SELECT d FROM (SELECT output FROM runs WHERE true {scope}
    UNION SELECT artifact FROM text_embedding_files UNION SELECT artifact FROM video_embedding_files
    UNION SELECT artifact FROM frame_lists UNION SELECT checkpoint_digest FROM results) reached(d)
    WHERE d IS NOT NULL"""
_KEPT_PATHS = """SELECT path FROM artifacts WHERE digest IN ({outputs}) AND path IS NOT NULL
    UNION ALL SELECT path FROM frame_clips WHERE entry_key IN ({used}) AND path IS NOT NULL"""
_SUPERSEDED = """
    AND (status <> 'done' OR (configuration IS NULL AND stage IN ('train', 'evaluate', 'features'))
         OR started_at = (SELECT max(started_at) FROM runs r2 WHERE r2.target = runs.target AND r2.status = 'done'))"""


def collect(catalog: Catalog, store: Store, superseded: bool, dry_run: bool, failed: bool = False) -> Report:
    report = Report()
    scope = _SUPERSEDED if superseded else ""
    with scratch_dir("msta-gc-") as spill:
        kept = _KeptPaths(spill)
        with catalog.transaction() as con:
            if failed:
                report.cleared = con.execute("SELECT target, key FROM runs WHERE status = 'failed' "
                                             "ORDER BY target, started_at").fetchall()
                if report.cleared and not dry_run:
                    con.execute("UPDATE runs SET status = 'cleared' WHERE status = 'failed'")
            report.superseded = con.execute(f"SELECT target, key FROM runs WHERE NOT (true {scope}) "
                                            "ORDER BY target, started_at").fetchall()
            used = _used_clips(con, store.home, report)
            kept.write(con.execute(_KEPT_PATHS.format(outputs=_OUTPUTS.format(scope=scope), used=used)))
            # Set-wise, one statement per table: a row at a time, a changed 240k list took N^2.
            for rows in (f"artifacts WHERE digest NOT IN ({_OUTPUTS.format(scope=scope)})",
                         f"frame_clips WHERE entry_key NOT IN ({used})"):
                report.rows += con.execute(f"SELECT count(*) FROM {rows}").fetchone()[0]
                if not dry_run:
                    con.execute(f"DELETE FROM {rows}")
            run_keys = {k[:16] for (k,) in con.execute(f"SELECT key FROM runs WHERE true {scope}").fetchall()}
            done = {k[:16] for (k,) in con.execute("SELECT key FROM runs WHERE status = 'done'").fetchall()}
        if store.artifacts.exists():
            _sweep_artifacts(store, kept, report, dry_run)
    if (store.home / "runs").exists():
        _sweep_runs(store, run_keys, done, report, dry_run)
    return report


def _used_clips(con: duckdb.DuckDBPyConnection, home: Path, report: Report) -> str:
    """The clip keys the current frame indexes name, read from their Parquet files (streamed); every
    clip while an index cannot be read (its clips cannot be told from the unused)."""
    usable, report.unreadable_indexes = index_files(con, home)
    if report.unreadable_indexes:
        return "SELECT entry_key FROM frame_clips"
    files = ", ".join(f"'{quoted(str(home / path))}'" for _, path in usable)
    if not files:
        return "SELECT NULL::VARCHAR AS entry_key WHERE false"
    return f"SELECT entry_key FROM read_parquet([{files}]) WHERE entry_key IS NOT NULL"


def _sweep_artifacts(store: Store, kept: _KeptPaths, report: Report, dry_run: bool) -> None:
    from tqdm import tqdm

    # 240k clips take a while to walk: a bar on a terminal
    for path in tqdm(_files(store.artifacts), desc="gc", unit="file", leave=False, disable=not sys.stderr.isatty()):
        if path.name.startswith(TMP_PREFIX):
            _remove(store, path, report, dry_run)
        elif not _store_named(path):
            report.foreign.append(store.relative(path))
        elif store.relative(path) not in kept:
            _remove(store, path, report, dry_run)


def _sweep_runs(store: Store, run_keys: set[str], done: set[str], report: Report, dry_run: bool) -> None:
    for folder in sorted((store.home / "runs").iterdir()):
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


def _files(top: Path) -> Iterator[Path]:
    """The plain files under `top` (not links), folders in name order: the store's two-character
    folders come in the order of _KeptPaths' parts, so each part is read once per kind."""
    for folder, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path


class _KeptPaths:
    """The kept paths under artifacts/, spilled to one file per first character of their folder
    (the digest's first hex digit) and held one part at a time: with a set of every clip path,
    `gc` peaked at 342 MB over 240k clips, now 202 (benchmarks/catalog_growth.py)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.part: tuple[str | None, set[str]] = (None, set())

    def _file(self, path: str) -> Path:
        return self.folder / str(ord(_part(path)))

    def write(self, result: duckdb.DuckDBPyConnection) -> None:
        """Spill the paths of a query's single column, read a batch at a time."""
        files: dict[Path, TextIO] = {}
        try:
            while batch := result.fetchmany(8192):
                for (path,) in batch:
                    f = self._file(path)
                    if f not in files:
                        files[f] = f.open("w", encoding="utf-8", errors="surrogateescape", newline="")
                    files[f].write(path + "\0")  # a path may hold any line break, never NUL
        finally:
            for f in files.values():
                f.close()

    def __contains__(self, path: str) -> bool:
        part = _part(path)
        if self.part[0] != part:
            f = self._file(path)
            text = ""
            if f.exists():  # newline="": a "\r" in a path stays one
                with f.open(encoding="utf-8", errors="surrogateescape", newline="") as g:
                    text = g.read()
            self.part = (part, set(text.split("\0")))
        return path in self.part[1]


def _part(path: str) -> str:
    """The first character of a path's folder name ("artifacts/clips/ab/ab12....clip" -> "a")."""
    parts = path.rsplit("/", 2)
    return parts[-2][:1] if len(parts) > 1 and parts[-2] else "/"


def _store_named(path: Path) -> bool:
    """Named as Store.artifact_path names a file: artifacts/KIND/ab/abcd...(.ext)."""
    m = _DIGEST_NAME.fullmatch(path.name)
    return m is not None and path.parent.name == m.group(1)[:2]


def _remove(store: Store, path: Path, report: Report, dry_run: bool) -> None:
    report.files += 1
    report.bytes += path.stat().st_size
    if not dry_run:
        path.unlink()
