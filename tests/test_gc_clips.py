"""`gc` over cached clips: the clips of current indexes stay, the others go with their rows, in
every two-character folder (gc holds its kept paths one folder initial at a time)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cache.catalog import Catalog, insert_rows
from cache.gc import collect
from cache.store import Store
from .conftest import register_index, run_cli


def _home_with_clips(home: Path, n: int) -> tuple[Store, list[Path], list[Path]]:
    """n registered clips over many folders; the even ones are in a current index."""
    store, catalog = Store(home), Catalog(home)
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    paths = [store.artifact_path("clips", k, ".clip") for k in keys]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"clip")
    with catalog.transaction() as con:
        insert_rows(con, "frame_clips", [{"entry_key": k, "path": store.relative(p), "bytes": 4}
                                         for k, p in zip(keys, paths)])
        register_index(con, home, "frames:toy:train",
                       [{"video": f"v{i}", "entry_key": k} for i, k in enumerate(keys) if i % 2 == 0])
    return store, paths[::2], paths[1::2]


def test_gc_keeps_the_clips_of_current_indexes_in_every_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store, used, unused = _home_with_clips(home, 600)
    assert len({p.parent.name[0] for p in used}) == 16 and len({p.parent.name for p in used}) > 150
    catalog = Catalog(home)

    dry = collect(catalog, store, superseded=False, dry_run=True)
    assert (dry.files, dry.rows) == (300, 300) and all(p.exists() for p in unused)

    done = collect(catalog, store, superseded=False, dry_run=False)
    assert (done.files, done.rows, done.foreign) == (300, 300, [])
    assert all(p.exists() for p in used) and not any(p.exists() for p in unused)
    with catalog.reader() as con:
        kept = {p for (p,) in con.execute("SELECT path FROM frame_clips").fetchall()}
    assert kept == {store.relative(p) for p in used}
    assert collect(catalog, store, superseded=False, dry_run=False).files == 0  # nothing left to do


def test_gc_keeps_reachable_files_whatever_their_path_holds(tmp_path: Path) -> None:
    """A path with a line break of any kind, and a row with no path, leave the rest intact."""
    home = tmp_path / "home"
    store, catalog = Store(home), Catalog(home)
    files = {kind: store.artifact_path(kind, hashlib.sha256(kind.encode()).hexdigest(), ".parquet")
             for kind in ("plain", "odd\nkind", "cr\rkind", "u\u2028kind")}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    with catalog.transaction() as con:
        insert_rows(con, "artifacts", [{"digest": p.stem, "kind": k, "path": store.relative(p), "file_sha256": "0"}
                                       for k, p in files.items()])
        insert_rows(con, "text_embedding_files", [{"dataset": k, "backbone": "b", "artifact": p.stem}
                                                  for k, p in files.items()])
        insert_rows(con, "frame_clips", [{"entry_key": "e" * 64, "path": None, "bytes": 1}])
        register_index(con, home, "t", [{"video": "v", "entry_key": "e" * 64}])
    report = collect(catalog, store, superseded=False, dry_run=False)
    assert (report.files, report.rows) == (0, 0)
    assert all(p.exists() for p in files.values())


@pytest.mark.parametrize("damage", ["removed", "not parquet", "no entry_key"])
def test_gc_keeps_every_clip_while_an_index_cannot_be_read(tmp_path: Path, damage: str) -> None:
    """A current list whose index file is gone or damaged names clips nobody can list: none is collected,
    and the command says why and what to do."""
    home = tmp_path / "home"
    store, used, unused = _home_with_clips(home, 40)
    with Catalog(home).reader() as con:
        (index,) = con.execute("SELECT path FROM frame_lists").fetchone()
    if damage == "removed":
        (home / index).unlink()
    elif damage == "not parquet":
        (home / index).write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    else:
        pq.write_table(pa.table({"video": ["v0"], "label": [0]}), home / index)
    with pytest.warns(UserWarning, match="frames:toy:train"):
        report = collect(Catalog(home), store, superseded=False, dry_run=False)
    assert report.unreadable_indexes == ["frames:toy:train"]
    assert report.rows == 0 and all(p.exists() for p in used + unused)
    r = run_cli("gc", "--dry-run", "--home", home)
    assert r.returncode == 0 and "kept every cached clip: the frame index of frames:toy:train cannot be read" in r.stdout
