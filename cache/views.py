"""The catalog's views, defined from code.

`msta-pipe sql` never trusts a view stored in the file (a catalog copied from someone else may
define `text_embeddings` over any file): on its private copy of the catalog every stored view is
dropped and the project's are defined anew, over this home's artifact files only. The views kept
in the file itself (for a `duckdb` shell) name their Parquet files relative to the home, so a
copied or moved home never reads the original's files: open it from the home folder.

Parquet `fixed_size_list<float32>[D]` reads back in DuckDB as `FLOAT[]`; the cast to `FLOAT[D]`
is what makes `array_cosine_similarity` usable in plain SQL.
"""
from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import duckdb

FRAMES = """
    SELECT l.dataset, l.list, i.video, i.label, c.sampling, c.shape, c.format, c.bytes,
           c.path AS clip_path, i.target, l.artifact
    FROM frame_index i JOIN frame_lists l USING (target) JOIN frame_clips c USING (entry_key)"""
# A catalog not yet migrated to schema 7 (`sql` never migrates: it only reads) holds a list's facts
# on every row of frame_index.
FRAMES_BEFORE_7 = """
    SELECT i.dataset, i.list, i.video, i.label, c.sampling, c.shape, c.format, c.bytes,
           c.path AS clip_path, i.target, i.artifact
    FROM frame_index i JOIN frame_clips c USING (entry_key)"""


@dataclass(frozen=True)
class FileView:
    """A view over the Parquet files a table registers (path under the home, embedding width)."""
    name: str
    table: str  # the table registering the files, with `path` and `dim`
    order: str
    columns: str
    empty: str  # the same columns, no rows: a view never reads no file

    def files(self, con: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
        return con.execute(f"SELECT path, dim FROM {self.table} ORDER BY {self.order}").fetchall()

    def select(self, files: list[tuple[str, int]], base: Path | None) -> str:
        """One SELECT over `files`, paths under `base` (None: as stored, relative to the home)."""
        if not files:
            return self.empty
        dims = {d for _, d in files}
        cast = f"FLOAT[{dims.pop()}]" if len(dims) == 1 else "FLOAT[]"  # mixed widths cannot share one type
        return "\nUNION ALL\n".join(
            f"SELECT {self.columns}, embedding::{cast} AS embedding "
            f"FROM read_parquet('{_quote(str(base / path if base else path))}')" for path, _ in files)


TEXT_EMBEDDINGS = FileView(
    "text_embeddings", "text_embedding_files", "dataset, backbone",
    "dataset, backbone, level, class_id, class_name, kind, idx, text, text_sha256",
    """SELECT NULL::VARCHAR AS dataset, NULL::VARCHAR AS backbone, NULL::VARCHAR AS level,
              NULL::INTEGER AS class_id, NULL::VARCHAR AS class_name, NULL::VARCHAR AS kind,
              NULL::INTEGER AS idx, NULL::VARCHAR AS text, NULL::VARCHAR AS text_sha256,
              NULL::FLOAT[] AS embedding WHERE false""")
VIDEO_EMBEDDINGS = FileView(
    "video_embeddings", "video_embedding_files", "target",
    "dataset, list, model, run_key, selection, backbone, video, label, class_name, level, view, clip, crop",
    """SELECT NULL::VARCHAR AS dataset, NULL::VARCHAR AS list, NULL::VARCHAR AS model, NULL::VARCHAR AS run_key,
              NULL::VARCHAR AS selection, NULL::VARCHAR AS backbone, NULL::VARCHAR AS video,
              NULL::INTEGER AS label, NULL::VARCHAR AS class_name, NULL::VARCHAR AS level, NULL::INTEGER AS view,
              NULL::INTEGER AS clip, NULL::INTEGER AS crop, NULL::FLOAT[] AS embedding WHERE false""")
FILE_VIEWS = (TEXT_EMBEDDINGS, VIDEO_EMBEDDINGS)


def refresh_stored(con: duckdb.DuckDBPyConnection, view: FileView, home: Path) -> None:
    """Redefine `view` in the catalog file after its table changed (paths relative to the home;
    DuckDB checks them as it binds the view, hence the search path, for this statement only)."""
    con.execute("SET file_search_path = ?", [str(home)])
    try:
        con.execute(f"CREATE OR REPLACE VIEW {view.name} AS {view.select(view.files(con), None)}")
    finally:
        con.execute("RESET file_search_path")


def define_views(con: duckdb.DuckDBPyConnection, home: Path, materialise: Collection[str] = ()) -> None:
    """On a private copy of a catalog: drop every stored view, define the project's from code over
    `home`'s own artifact files, and turn those named in `materialise` into tables (read now,
    before file access is switched off)."""
    for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall():
        con.execute(f'DROP VIEW "{name.replace(chr(34), chr(34) * 2)}"')
    tables = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    if {"frame_index", "frame_clips"} <= tables:
        con.execute(f"CREATE VIEW frames AS {FRAMES if 'frame_lists' in tables else FRAMES_BEFORE_7}")
    for view in FILE_VIEWS:
        files = _inside(home, view.files(con)) if view.table in tables else []
        kind = "TABLE" if view.name in materialise else "VIEW"
        con.execute(f"CREATE {kind} {view.name} AS {view.select(files, home)}")


def _inside(home: Path, files: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The registered files that are regular files under the home's artifacts/ (a received catalog
    may name any path)."""
    root = (home / "artifacts").resolve()
    kept = []
    for path, dim in files:
        full = (home / str(path)).resolve()
        if full.is_relative_to(root) and full.is_file() and isinstance(dim, int):
            kept.append((path, dim))
        else:
            warnings.warn(f"the catalog names {path!r}, which is not a file under {root}: left out of the views")
    return kept


def _quote(path: str) -> str:
    return path.replace("'", "''")
