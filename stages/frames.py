"""frames: decode every video of a list once, sample it, and cache uint8 frames per clip.

Item cache: one file per (video identity = path, size, mtime; sampling; decoder; format),
written atomically by a worker and registered in `frame_clips` in small batches. After a
kill -9, files that were written but not registered are recognised by their key and
registered without decoding again. The stage's artifact is the index of a list: which
cached clip holds which video, with its label.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cache.catalog import insert_rows, utcnow
from pipeline.errors import UserError
from pipeline.keys import digest_value
from pipeline.runner import Context
from pipeline.stage import Artifact, Output, Request, Resolved, Stage, StageFailed, artifact_of, path_of
from pipeline.videolists import draw_per_class, read_video_list, resolve_videos

from .labels import read_classes

INDEX_SCHEMA = pa.schema([("video", pa.string()), ("label", pa.int32()), ("entry_key", pa.string()),
                          ("clip_path", pa.string()), ("source", pa.string()), ("size", pa.int64()),
                          ("mtime_ns", pa.int64())])


@dataclass(frozen=True)
class Job:
    entry_key: str
    video: str  # path relative to the video root: the sampling's stable key
    source: str
    dest: str
    size: int
    mtime_ns: int


def _decode_one(job: Job, sampling: dict[str, Any], decoder: str, fmt: str) -> tuple[str, list[int], int, str]:
    """Worker: decode, sample, store. Returns (entry_key, shape, bytes, error)."""
    from msta.clipstore import save_clip
    from msta.video import Sampling, VideoError, decode_clip

    try:
        frames = decode_clip(job.source, Sampling(**sampling), decoder=decoder, key=job.video)
    except VideoError as exc:
        return job.entry_key, [], 0, str(exc)
    except Exception as exc:  # a decoder bug on one file must not stop the list
        return job.entry_key, [], 0, f"{job.source}: {type(exc).__name__}: {exc}"
    size = save_clip(job.dest, frames, fmt)
    return job.entry_key, list(frames.shape), size, ""


class FramesStage(Stage):
    name = "frames"
    code_version = "1"

    def target(self, req: Request) -> str:
        p = req.params
        target = f"frames:{p['dataset']}:{p['list']}:{p['mode']}"
        select = p["select"]
        if select is not None:
            target += f":{select['per_class'] or 'all'}pc-s{select['seed']}"
            if select["exclude_draw"]:
                target += f"-minus-{select['exclude_draw'][0]}pc-s{select['exclude_draw'][1]}"
        return target + ("-minus-list" if "exclude" in req.inputs else "")

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output:
        from tqdm import tqdm

        p = req.params
        classes = read_classes(artifact_of(inputs["classes"]))
        list_path = path_of(inputs["list"])
        root = Path(req.locators["video_root"])
        names = [raw for _, raw, _ in classes]
        items = read_video_list(list_path, names)
        if "exclude" in inputs:
            excluded = {it.relpath for it in read_video_list(path_of(inputs["exclude"]), names)}
            items = [it for it in items if it.relpath not in excluded]
        select = p["select"]
        if select is not None:
            if select["exclude_draw"]:
                k, seed = select["exclude_draw"]
                drawn = {it.relpath for it in draw_per_class(items, k, seed, names)}
                items = [it for it in items if it.relpath not in drawn]
            items = draw_per_class(items, select["per_class"], select["seed"], names)
        paths, missing = resolve_videos(items, root, list_path)
        if missing and not p["skip_missing"]:
            raise UserError(f"{len(missing)} of {len(items)} videos of {list_path} are missing under {root}, e.g. "
                            f"{', '.join(missing[:3])}; fix video_root or pass --skip-missing", 2)
        if missing:
            ctx.echo(f"       skipping {len(missing)} missing videos, e.g. {', '.join(missing[:3])}")
        missing_set = set(missing)
        jobs: list[tuple[Job, int]] = []
        for it, path in zip(items, paths):
            if it.relpath in missing_set:
                continue
            st = path.stat()
            key = digest_value({"video": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "sampling": p["sampling"], "decoder": p["decoder"], "format": p["format"]})
            dest = ctx.store.artifact_path("clips", key, ".clip")
            jobs.append((Job(key, it.relpath, str(path), str(dest), st.st_size, st.st_mtime_ns), it.label))
        known = self._registered(ctx, [j.entry_key for j, _ in jobs])
        todo, adopt = [], []
        for job, _ in jobs:
            if job.entry_key in known and Path(job.dest).exists():
                continue
            (adopt if _readable(job.dest) else todo).append(job)
        if adopt:  # written by a killed run, never registered
            self._register(ctx, adopt, [_shape_of(j.dest) for j in adopt], p)
        failures: dict[str, str] = {}
        decoded = 0
        started = time.perf_counter()
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"frames {p['list']}", unit="clip",
                  disable=not ctx.option("progress", True)) as bar:
            batch: list[tuple[Job, list[int], int]] = []
            for job, shape, size, error in self._decode(todo, p, int(req.locators.get("workers", 1))):
                bar.update(1)
                if error:
                    failures[job.video] = error
                    continue
                decoded += 1
                batch.append((job, shape, size))
                if len(batch) >= 64:
                    self._register(ctx, [b[0] for b in batch], [(b[1], b[2]) for b in batch], p)
                    batch = []
            self._register(ctx, [b[0] for b in batch], [(b[1], b[2]) for b in batch], p)
        rows = [{"video": j.video, "label": label, "entry_key": j.entry_key,
                 "clip_path": ctx.store.relative(Path(j.dest)), "source": j.source, "size": j.size, "mtime_ns": j.mtime_ns}
                for j, label in jobs if j.video not in failures]
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
        total_bytes = sum(Path(j.dest).stat().st_size for j, _ in jobs if j.video not in failures)
        summary = {"videos": len(items), "clips": len(rows), "decoded": decoded, "cached": len(rows) - decoded,
                   "failed": len(failures), "missing": len(missing), "bytes": total_bytes,
                   "seconds": round(time.perf_counter() - started, 3)}
        ctx.echo(f"       {len(rows)} clips ({decoded} decoded, {len(rows) - decoded} cached), {len(failures)} failed, "
                 f"{len(missing)} missing; {total_bytes / max(1, len(rows)) / 1e3:.1f} kB per clip")
        if failures:
            ctx.echo(f"       videos that could not be decoded ({len(failures)}; all in the frame_failures table):")
            for video, error in list(failures.items())[:10]:
                ctx.echo(f"         {video}: {error[:150]}")

        def publish(con, artifact: Artifact) -> None:
            target = self.target(req)
            con.execute("DELETE FROM frame_index WHERE target = ?", [target])
            insert_rows(con, "frame_index",
                        [{"target": target, "artifact": artifact.digest, "dataset": p["dataset"], "list": p["list"],
                          "video": r["video"], "label": r["label"], "entry_key": r["entry_key"]} for r in rows])
            con.execute("DELETE FROM frame_failures WHERE dataset = ? AND list = ?", [p["dataset"], p["list"]])
            insert_rows(con, "frame_failures",
                        [{"dataset": p["dataset"], "list": p["list"], "video": v, "error": e, "run_id": ctx.run_id,
                          "created_at": utcnow()} for v, e in failures.items()])

        output = Output(kind="frame_index", table=table, publish=publish, summary=summary,
                        meta={"dataset": p["dataset"], "list": p["list"], "sampling": p["sampling"]})
        if failures and req.locators.get("strict"):
            raise StageFailed(f"{len(failures)} videos could not be decoded (--strict)", output)
        if not rows:
            raise StageFailed(f"no video of {list_path} could be decoded", output)
        return output

    def _decode(self, todo: Sequence[Job], p: Mapping[str, Any], workers: int
                ) -> Iterator[tuple[Job, list[int], int, str]]:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                _, shape, size, error = _decode_one(job, p["sampling"], p["decoder"], p["format"])
                yield job, shape, size, error
            return
        # spawn: decord and torch threads do not survive fork reliably
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [(job, pool.submit(_decode_one, job, p["sampling"], p["decoder"], p["format"])) for job in todo]
            for job, fut in futures:
                _, shape, size, error = fut.result()
                yield job, shape, size, error

    def _registered(self, ctx: Context, keys: list[str]) -> set[str]:
        with ctx.catalog.transaction() as con:  # only this list's keys leave the catalog, not every clip's
            con.register("_wanted_keys", pa.table({"entry_key": keys}))
            try:
                return {k for (k,) in con.execute(
                    "SELECT entry_key FROM frame_clips JOIN _wanted_keys USING (entry_key)").fetchall()}
            finally:
                con.unregister("_wanted_keys")

    def _register(self, ctx: Context, jobs: Sequence[Job], shapes: Sequence[tuple[list[int], int]],
                  p: Mapping[str, Any]) -> None:
        import json

        with ctx.catalog.transaction() as con:
            insert_rows(con, "frame_clips",
                        [{"entry_key": j.entry_key, "video": j.source, "size": j.size, "mtime_ns": j.mtime_ns,
                          "sampling": json.dumps(p["sampling"]), "shape": shape,
                          "path": ctx.store.relative(Path(j.dest)), "bytes": size, "format": p["format"],
                          "created_at": utcnow()} for j, (shape, size) in zip(jobs, shapes)], "OR REPLACE")

    def check(self, artifact: Artifact, home: Path) -> str:
        """A cached index holds only while its clips exist and its videos are unchanged."""
        rows = pq.read_table(artifact.path, columns=["video", "clip_path", "source", "size", "mtime_ns"]).to_pylist()
        for row in rows:
            if not (home / row["clip_path"]).exists():
                return f"the cached clip of {row['video']} is gone"
            try:
                st = os.stat(row["source"])
            except FileNotFoundError:
                return f"video {row['video']} was removed"
            if (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"]):
                return f"video {row['video']} changed"
        return ""

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        p = req.params
        return f"decode the videos of list {p['list']} ({p['mode']} sampling {p['sampling']})"


def read_frame_index(artifact_path: Path, home: Path) -> list[tuple[str, int]]:
    """(absolute clip path, label) of a frames artifact, in list order."""
    t = pq.read_table(artifact_path, columns=["clip_path", "label"])
    return [(str(home / c), int(l)) for c, l in zip(t["clip_path"].to_pylist(), t["label"].to_pylist())]


def _readable(path: str) -> bool:
    """A clip file at its final name was renamed there whole (atomic write); its header suffices."""
    from msta.clipstore import ClipStoreError, clip_shape

    try:
        clip_shape(path)
        return True
    except (ClipStoreError, OSError):
        return False


def _shape_of(path: str) -> tuple[list[int], int]:
    from msta.clipstore import clip_shape

    return list(clip_shape(path)), os.path.getsize(path)
