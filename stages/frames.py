"""frames: decode every video of a list once, sample it, and cache uint8 frames per clip.

Item cache: one file per (video identity = path, size, mtime; sampling; decoder; format),
written atomically by a worker and registered in `frame_clips` in small batches. After a
kill -9, files that were written but not registered are recognised by their key and
registered without decoding again. The stage's artifact is the index of a list: which
cached clip holds which video, with its label.

A registered clip counts only while its file has the registered size (checked by `status`) and
digest (checked where the file is read whole anyway: by `frames --force` and by the readers of
an index, train and evaluate); an altered clip is decoded again, never trusted. Decoding
processes die with the command (a kill -9 leaves none writing), and Ctrl-C stops them at once,
keeping the clips already decoded.
"""
from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cache.catalog import Catalog, Deferred, insert_rows, utcnow
from cache.errors import UserError
from cache.keys import digest_value
from cache.store import Store, sha256_file
from cache.views import refresh_frames
from stages.engine.stage import Artifact, Context, Output, Request, Resolved, Stage, StageFailed, artifact_of, path_of
from stages.formats.videolists import (VideoItem, draw_per_class, missing_videos, read_video_list,
                                      read_video_list_counted)
from stages.artifacts import clip_intact, read_classes, registered_clips

CHUNK = 2048  # videos handled together: what stays in memory besides the index's columns
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


@dataclass(frozen=True)
class Clip:
    """A stored clip file as `frame_clips` registers it."""
    shape: list[int]
    bytes: int
    sha256: str


def _clip_of(path: str, shape: list[int] | None = None) -> Clip:
    from msta.video.clipstore import clip_shape

    return Clip(shape or list(clip_shape(path)), os.path.getsize(path), sha256_file(path))


def _decode_one(job: Job, sampling: dict[str, Any], decoder: str, fmt: str) -> tuple[Job, Clip | None, str]:
    """Worker: decode, sample, store. Returns (job, the stored clip or None, error)."""
    from msta.video.clipstore import save_clip
    from msta.video.decode import Sampling, VideoError, decode_clip

    try:
        frames = decode_clip(job.source, Sampling(**sampling), decoder=decoder, key=job.video)
    except VideoError as exc:
        return job, None, str(exc)
    except Exception as exc:  # a decoder bug on one file must not stop the list
        return job, None, f"{job.source}: {type(exc).__name__}: {exc}"
    save_clip(job.dest, frames, fmt)
    return job, _clip_of(job.dest, list(frames.shape)), ""


def _worker_init(parent: int) -> None:
    """A decoding process dies with the command that started it: after a kill -9 of the command
    it must not go on writing clips into a home whose lock is gone. Ctrl-C is the command's to
    handle (it stops the pool and keeps what is done), so workers ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, ctypes.c_ulong(signal.SIGKILL))
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the command died before the signal was armed
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


class FramesStage(Stage):
    code_version = "1"

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
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
        items, repeated = read_video_list_counted(list_path, names, p.get("dedupe", False))
        if repeated:
            ctx.echo(f"       kept {repeated} repeated list lines once (--dedupe): each video's first line counts")
        if "exclude" in inputs:
            items = items.without(read_video_list(path_of(inputs["exclude"]), names, p.get("dedupe", False)))
        select = p["select"]
        if select is not None:
            if select["exclude_draw"]:
                k, seed = select["exclude_draw"]
                items = items.without(draw_per_class(items, k, seed, names))
            # a draw in test mode is the held-out one (training draws the shots in train mode)
            items = draw_per_class(items, select["per_class"], select["seed"], names,
                                   "--heldout-per-class" if p["mode"] == "test" else "--shots")
        missing = missing_videos(items, root, list_path)
        if missing and not p["skip_missing"]:
            raise UserError(f"{len(missing)} of {len(items)} videos of {list_path} are missing under {root}, e.g. "
                            f"{', '.join(missing[:3])}; fix video_root or pass --skip-missing", 2)
        if missing:
            ctx.echo(f"       skipping {len(missing)} missing videos, e.g. {', '.join(missing[:3])}")
        present = items.without(missing)
        clips = Deferred(ctx.catalog, partial(self._register, ctx.store, p), batch=64)
        failures: dict[str, str] = {}
        decoded = total_bytes = 0
        started = time.perf_counter()
        # In chunks: per-video objects (jobs, registered clips, rows) live for one chunk, and the
        # index goes to disk chunk by chunk, so memory does not grow with the list.
        index = ctx.store.table_sink("frame_index", INDEX_SCHEMA)
        with index.discarded_on_error(), \
                tqdm(total=len(present), desc=f"frames {p['list']}", unit="clip",
                     disable=not ctx.option("progress", True)) as bar, \
                _Decoder(p, int(req.locators.get("workers", 1))) as decoder:
            try:
                for first in range(0, len(present), CHUNK):
                    jobs = self._jobs(present[first:first + CHUNK], root, p, ctx, failures)
                    clips.flush()  # the lookup below sees every clip this run registered
                    todo, replaced = self._cached(jobs, ctx, clips)
                    bar.update(len(present[first:first + CHUNK]) - len(todo))
                    for job, clip, error in decoder.decode(todo):
                        bar.update(1)
                        if clip is None:
                            failures[job.video] = error
                            continue
                        decoded += 1
                        clips.add([(job, clip, job.entry_key in replaced)])
                    kept = [(j, label) for j, label in jobs if j.video not in failures]
                    total_bytes += sum(os.path.getsize(j.dest) for j, _ in kept)
                    index.write(pa.RecordBatch.from_pylist(
                        [{"video": j.video, "label": label, "entry_key": j.entry_key,
                          "clip_path": ctx.store.relative(Path(j.dest)), "source": j.source, "size": j.size,
                          "mtime_ns": j.mtime_ns} for j, label in kept], schema=INDEX_SCHEMA))
            except KeyboardInterrupt:
                clips.flush()
                ctx.echo(f"       interrupted: the {decoded} clips decoded so far are cached; a rerun decodes "
                         "only the others")
                raise
            clips.flush()
        n = index.num_rows
        summary = {"videos": len(items), "clips": n, "decoded": decoded, "cached": n - decoded,
                   "failed": len(failures), "missing": len(missing), "repeated": repeated, "bytes": total_bytes,
                   "seconds": round(time.perf_counter() - started, 3)}
        ctx.echo(f"       {n} clips ({decoded} decoded, {n - decoded} cached), {len(failures)} failed, "
                 f"{len(missing)} missing; {total_bytes / max(1, n) / 1e3:.1f} kB per clip")
        if failures:
            ctx.echo(f"       videos that could not be decoded ({len(failures)}; all in the frame_failures table):")
            for video, error in list(failures.items())[:10]:
                ctx.echo(f"         {video}: {error[:150]}")

        def publish(con, artifact: Artifact) -> None:
            # the index stays in its Parquet file: the `frames` view reads it there
            insert_rows(con, "frame_lists", [{"target": ctx.target, "artifact": artifact.digest, "dataset": p["dataset"],
                                              "list": p["list"], "path": ctx.store.relative(artifact.path)}],
                        "OR REPLACE")
            refresh_frames(con, ctx.home)
            con.execute("DELETE FROM frame_failures WHERE dataset = ? AND list = ?", [p["dataset"], p["list"]])
            insert_rows(con, "frame_failures",
                        [{"dataset": p["dataset"], "list": p["list"], "video": v, "error": e, "run_id": ctx.run_id,
                          "created_at": utcnow()} for v, e in failures.items()])

        # `failed` lets --strict judge a cached result too
        output = Output(kind="frame_index", rows=index, publish=publish, summary=summary,
                        meta={"dataset": p["dataset"], "list": p["list"], "sampling": p["sampling"],
                              "failed": len(failures), "failed_videos": sorted(failures)[:3],
                              "missing": len(missing), "repeated": repeated})
        if failures and req.locators.get("strict"):
            raise StageFailed(f"{len(failures)} videos could not be decoded (--strict)", output)
        if not n:
            raise StageFailed(f"no video of {list_path} could be decoded", output)
        return output

    def _jobs(self, items: Sequence[VideoItem], root: Path, p: Mapping[str, Any], ctx: Context,
              failures: dict[str, str]) -> list[tuple[Job, int]]:
        """Each video's identity (path, size, mtime, sampling) and clip path; a video that cannot be
        stat'ed (a symlink loop, a permission) is a failed video, not the end of the list."""
        jobs = []
        for it in items:
            path = root / it.relpath
            try:
                st = path.stat()
                path = path.resolve()
            except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
                failures[it.relpath] = f"{path}: {getattr(exc, 'strerror', None) or exc}"
                continue
            if not stat.S_ISREG(st.st_mode):  # a folder or a FIFO (which would block the decoder)
                failures[it.relpath] = f"{path}: not a regular file"
                continue
            key = digest_value({"video": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "sampling": p["sampling"], "decoder": p["decoder"], "format": p["format"]})
            dest = ctx.store.artifact_path("clips", key, ".clip")
            jobs.append((Job(key, it.relpath, str(path), str(dest), st.st_size, st.st_mtime_ns), it.label))
        return jobs

    def _cached(self, jobs: Sequence[tuple[Job, int]], ctx: Context, clips: Deferred) -> tuple[list[Job], set[str]]:
        """The jobs to decode, and which of their keys have a row to replace (an altered clip, a
        second path to one file); a clip written by a killed run and never registered (or registered
        before clips had digests) is registered now, without decoding."""
        known = registered_clips(ctx.catalog, [j.entry_key for j, _ in jobs], digests=True)
        todo, adopt, replaced, seen = [], [], set(), set()
        for job, _ in jobs:
            entry = known.get(job.entry_key)
            if entry is not None and clip_intact(job.dest, *entry, verify=ctx.forced):
                if entry[1] is None:
                    adopt.append(job)
                continue
            if entry is not None or job.entry_key in seen:  # a symlink's target listed twice, say
                replaced.add(job.entry_key)
            seen.add(job.entry_key)
            (adopt if entry is None and _readable(job.dest) else todo).append(job)
        clips.add([(j, _clip_of(j.dest), j.entry_key in replaced or j.entry_key in known) for j in adopt])
        return todo, replaced

    @staticmethod
    def _register(store: Store, p: Mapping[str, Any], con: Any, clips: Sequence[tuple[Job, Clip, bool]]) -> None:
        """Insert the clips' rows, each key once: frame_clips has no key constraint (checking one
        made every commit load a growing index), so a row to replace is deleted first."""
        import json

        rows = {j.entry_key: {"entry_key": j.entry_key, "video": j.source, "size": j.size, "mtime_ns": j.mtime_ns,
                              "sampling": json.dumps(p["sampling"]), "shape": c.shape,
                              "path": store.relative(Path(j.dest)), "bytes": c.bytes, "sha256": c.sha256,
                              "format": p["format"], "created_at": utcnow()} for j, c, _ in clips}
        replaced = sorted({j.entry_key for j, _, replace in clips if replace})
        if replaced:  # rare: a scan of the table
            con.execute("DELETE FROM frame_clips WHERE entry_key IN (SELECT unnest(?::VARCHAR[]))", [replaced])
        insert_rows(con, "frame_clips", list(rows.values()))

    def check(self, artifact: Artifact, home: Path) -> str:
        """A cached index holds only while its clips have their registered sizes and its videos are
        unchanged (digests cost a read of every clip: they are checked where clips are read)."""
        index = pq.ParquetFile(artifact.path)
        columns = ["video", "entry_key", "clip_path", "source", "size", "mtime_ns"]
        for batch in index.iter_batches(batch_size=CHUNK, columns=columns):  # memory: one chunk, not the list
            rows = batch.to_pylist()
            registered = registered_clips(Catalog(home), [r["entry_key"] for r in rows], digests=False)
            for row in rows:
                clip = home / row["clip_path"]
                if not clip.exists():
                    return f"the cached clip of {row['video']} is gone"
                if not clip_intact(str(clip), *registered.get(row["entry_key"], (-1, None)), verify=False):
                    return f"the cached clip of {row['video']} was altered"
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


class _Decoder:
    """Decoding processes for the whole command (spawned once, on the first clip to decode), fed one
    chunk of jobs at a time. Leaving the scope on an error or Ctrl-C stops them at once."""

    def __init__(self, p: Mapping[str, Any], workers: int) -> None:
        self.work = partial(_decode_one, sampling=p["sampling"], decoder=p["decoder"], fmt=p["format"])
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.before: set[Any] = set()

    def decode(self, todo: Sequence[Job]) -> Iterator[tuple[Job, Clip | None, str]]:
        if self.workers <= 1 or len(todo) <= 1 and self.pool is None:
            yield from map(self.work, todo)
            return
        if self.pool is None:  # spawn: decord and torch threads do not survive fork reliably
            self.before = set(active_children())
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                            initializer=_worker_init, initargs=(os.getpid(),))
        for future in as_completed([self.pool.submit(self.work, job) for job in todo]):
            yield future.result()

    def __enter__(self) -> _Decoder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if self.pool is None:
            return
        if exc_type is not None:  # Ctrl-C, an error: stop now, not after the chunk
            for process in set(active_children()) - self.before:
                process.terminate()
        self.pool.shutdown(wait=exc_type is None, cancel_futures=True)


def _readable(path: str) -> bool:
    """A clip file at its final name was renamed there whole (atomic write); its header suffices."""
    from msta.video.clipstore import ClipStoreError, clip_shape

    try:
        clip_shape(path)
        return True
    except (ClipStoreError, OSError):
        return False
