"""The catalog's share of `frames`' and `gc`'s memory at Kinetics size, without decoding 240k videos.

`scale.py` decodes every listed video, so its largest list is 16k-32k videos. What `frames` still
does per video beyond that is catalog work: it registers its clips in `frame_clips` 64 at a time
(each batch opens the catalog anew, as a stage's own work does) and looks up each chunk of 2048
keys. This builds the catalog with 16k, 64k and 240k registered clips through the project's own
schema, then runs, in a fresh process per size, what `frames` does for 16 chunks (32k videos):
the lookups and the batched registration. The `gc` part also writes a one-byte file per clip and
indexes every clip, then runs `gc --dry-run`'s collection over them; the `sql` part runs
`msta-pipe sql`'s query over `frames` in its sandbox, with the index read from its file and, for
comparison, from a table as before migration 9. Prints the peak RSS per size and 240k/16k, per part.

    python benchmarks/catalog_growth.py                        # about 3 min on 2 cores
    python benchmarks/catalog_growth.py --parts registrations  # one part alone
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
import sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from cache.catalog import Catalog, insert_rows
from cache.views import refresh_frames
from benchmarks.catalog_growth import clip_rows
home, n, files = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "files"
catalog = Catalog(home)
index = home / "artifacts" / "frame_index" / "00" / ("0" * 64 + ".parquet")  # every clip current, as after
index.parent.mkdir(parents=True, exist_ok=True)                            # `frames` over a 240k list
schema = pa.schema([("video", pa.string()), ("label", pa.int32()), ("entry_key", pa.string())])
with pq.ParquetWriter(index, schema) as writer:
    for first in range(0, n, 20000):
        rows = clip_rows(first, min(n, first + 20000))
        with catalog.transaction() as con:
            insert_rows(con, "frame_clips", rows)
        if files:
            writer.write_table(pa.Table.from_pylist(  # the video as its list names it, under the video root
                [{"video": r["video"].split("/train/")[1], "label": i % 400, "entry_key": r["entry_key"]}
                 for i, r in enumerate(rows, first)], schema=schema))
            for r in rows:
                (home / r["path"]).parent.mkdir(parents=True, exist_ok=True)
                (home / r["path"]).write_bytes(b"c")
if files:
    with catalog.transaction() as con:
        path = str(index.relative_to(home))
        insert_rows(con, "artifacts", [{"digest": "0" * 64, "kind": "frame_index", "path": path, "file_sha256": "0"}])
        insert_rows(con, "frame_lists", [{"target": "frames:k400:train", "artifact": "0" * 64, "path": path}])
        refresh_frames(con, home)
"""

GC = """
import resource, sys
from pathlib import Path
from cache.catalog import Catalog
from cache.gc import collect
from cache.store import Store
home = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = collect(Catalog(home), Store(home), superseded=False, dry_run=True)
assert report.files == 0 and not report.foreign, report
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before / 1024)
"""

# `msta-pipe sql`'s query over `frames` in its sandbox
SQL = """
import resource, sys
from pathlib import Path
from cache.catalog import Catalog
catalog = Catalog(Path(sys.argv[1]))
with catalog.snapshot() as copy:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    con = catalog.sandboxed_reader(copy, ["frames"])
    (n, _, _), = con.execute("SELECT count(*), count(DISTINCT video), sum(bytes) FROM frames").fetchall()
    assert n > 0
    con.close()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before / 1024)
"""

# A copy of the catalog with the index in a frame_index table, which `sql` reads as it read a catalog
# before migration 9 (made in its own process: the copying is not the query's memory)
INDEX_TABLE = """
import shutil, sys
from pathlib import Path
import duckdb
home, copy = Path(sys.argv[1]), Path(sys.argv[2])
copy.mkdir()
shutil.copyfile(home / "catalog.duckdb", copy / "catalog.duckdb")
con = duckdb.connect(str(copy / "catalog.duckdb"))
(path,) = con.execute("SELECT path FROM frame_lists").fetchone()
con.execute("CREATE TABLE frame_index AS SELECT target, video, label, entry_key FROM frame_lists, read_parquet(?)",
            [str(home / path)])
con.close()
"""

# What frames does for 16 chunks of new videos: look the chunk up, register its clips 64 at a time.
WORK = """
import resource, sys
from pathlib import Path
from cache.catalog import Catalog, Deferred, insert_rows
from stages.artifacts import registered_clips
from benchmarks.catalog_growth import clip_rows, key
catalog, n = Catalog(Path(sys.argv[1])), int(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
clips = Deferred(catalog, lambda con, rows: insert_rows(con, "frame_clips", rows), batch=64)  # new keys only
with catalog.kept_open(), catalog.let_go():
    for chunk in range(16):
        first = n + chunk * 2048
        if "lookups" in sys.argv[3]:
            known = registered_clips(catalog, [key(i) for i in range(first, first + 2048)], digests=True)
            assert not known
        if "registrations" in sys.argv[3]:
            for i in range(first, first + 2048, 64):
                clips.add(clip_rows(i, i + 64))
    clips.flush()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before / 1024)
"""


def key(i: int) -> str:
    """A clip's key is a SHA-256: random, not sequential (an index over sequential keys is cheap)."""
    return hashlib.sha256(str(i).encode()).hexdigest()


def clip_rows(first: int, last: int) -> list[dict]:
    """`frame_clips` rows shaped like those of a Kinetics-sized list."""
    import datetime

    now = datetime.datetime(2026, 1, 1)
    return [{"entry_key": key(i), "video": f"/data/kinetics400/train/c{i % 400:03d}/{i:011d}_000010_000020.mp4",
             "size": 1_000_000 + i, "mtime_ns": 1_700_000_000_000_000_000 + i,
             "sampling": '{"frames": 8, "mode": "train", "samplings": 2}', "shape": [2, 8, 3, 256, 340],
             "path": f"artifacts/clips/{key(i)[:2]}/{key(i)}.clip", "bytes": 295_000, "format": "uint8",
             "created_at": now, "sha256": key(i)[::-1]} for i in range(first, last)]


def child(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        sys.exit(out.stderr[-2000:])
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16000,64000,240000", help="registered clips per size, comma-separated")
    parser.add_argument("--parts", default="lookups,registrations,gc,sql",
                        help="what to run: lookups (a chunk's keys), registrations (64 clips a transaction), "
                             "gc (its collection over that many clip files), sql (`msta-pipe sql`'s query over "
                             "frames, also with the index in a table as before migration 9); the frames parts "
                             "run together")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    parts = args.parts.split(",")
    frames_parts = ",".join(p for p in parts if p in ("lookups", "registrations"))
    peaks: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="msta-catalog-growth-") as tmp:
        for n in sizes:
            home = Path(tmp) / str(n)
            child(BUILD, str(home), str(n), "files" if {"gc", "sql"} & set(parts) else "rows")
            size_mb = (home / "catalog.duckdb").stat().st_size / 1e6
            runs = [("gc", GC, (str(home),))] if "gc" in parts else []  # first: the frames parts register more clips
            if "sql" in parts:
                table_home = Path(tmp) / f"{n}-index-table"
                child(INDEX_TABLE, str(home), str(table_home))
                runs += [("sql", SQL, (str(home),)),
                         ("sql, index in a table (before migration 9)", SQL, (str(table_home),))]
            if frames_parts:
                runs.append((frames_parts, WORK, (str(home), str(n), frames_parts)))
            for name, code, args in runs:
                peak, start = (float(x) for x in child(code, *args).split())
                print(f"  {name}: {n:>7} clips registered (catalog {size_mb:.0f} MB): peak RSS {peak:.0f} MB "
                      f"({peak - start:+.0f} MB over the process before the work)", flush=True)
                peaks.setdefault(name, []).append(peak)
    for name, values in peaks.items():
        what = {"gc": "gc --dry-run's collection", "sql": "sql's query over frames"}.get(
            name, name if name.startswith("sql") else f"frames' catalog work ({name}) over 16 chunks of 2048 videos")
        print(f"{what}, fresh process per size: peak RSS {', '.join(f'{p:.0f}' for p in values)} MB at "
              f"{', '.join(map(str, sizes))} registered clips; largest/smallest {values[-1] / values[0]:.2f}")


if __name__ == "__main__":
    main()
