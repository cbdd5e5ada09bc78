"""Garbage collection with an explicit scope (DVC's habit): what the catalog reaches stays.

Reached: the output and the working folder of every run (checkpoints of an interrupted training,
the best-heldout and snapshot weights of a finished one), artifacts named by the catalog's
current tables, and the clips of current frame indexes. Everything else under artifacts/ and
runs/ goes. A target is one configuration and repeat (a training's target names its configuration,
seed and split), so with `superseded` only the runs a later completed run of the same target
replaced go (new code, new input contents), and are listed by name; training, evaluation and
features runs registered before targets named their configuration are never counted as superseded
(their targets then shared one name across configurations). With `failed`, failed runs
are marked `cleared`: `status` stops reporting them (the rows stay, as history).
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cache.catalog import Catalog
from cache.store import TMP_PREFIX, Store


@dataclass
class Report:
    files: int = 0
    bytes: int = 0
    rows: int = 0
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
    report = Report(rows=len(drop_digests) + len(drop_clips), superseded=dropped, cleared=cleared)
    if store.artifacts.exists():
        from tqdm import tqdm

        # 240k clips take a while to walk: a bar on a terminal
        walk = tqdm(store.artifacts.rglob("*"), desc="gc", unit="file", leave=False, disable=not sys.stderr.isatty())
        for path in walk:
            if path.is_file() and (path.name.startswith(TMP_PREFIX) or store.relative(path) not in keep_paths):
                _remove(path, report, dry_run)
    runs_dir = store.home / "runs"
    if runs_dir.exists():
        for folder in runs_dir.iterdir():
            if folder.is_dir() and folder.name not in run_keys:
                _remove(folder, report, dry_run)
    return report


def _remove(path: Path, report: Report, dry_run: bool) -> None:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    report.files += len(files)
    report.bytes += sum(p.stat().st_size for p in files)
    if not dry_run:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
