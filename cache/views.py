"""The catalog's views, defined from code.

`msta-pipe sql` never trusts a view or macro stored in the file (a catalog copied from someone else
may define `text_embeddings` over any file, or a `read_parquet` macro): on its private copy of the
catalog every stored view and macro is dropped and the project's views are defined anew, over this
home's artifact files only. The views kept in the file itself (for a `duckdb` shell) name their
Parquet files relative to the home, so a copied or moved home never reads the original's files:
open it from the home folder.

Parquet `fixed_size_list<float32>[D]` reads back in DuckDB as `FLOAT[]`; the cast to `FLOAT[D]`
is what makes `array_cosine_similarity` usable in plain SQL.
"""
from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import duckdb

# A list's index is its Parquet artifact (video, label, entry_key per line), registered in
# frame_lists; the view joins each index file to its list's facts and its clips' rows.
_FRAMES = """
    SELECT l.dataset, l.list, i.video, i.label, c.sampling, c.shape, c.format, c.bytes,
           c.path AS clip_path, i.target, l.artifact
    FROM ({index}) i JOIN frame_lists l USING (target) JOIN frame_clips c USING (entry_key)"""
# A catalog not yet migrated to schema 9 (`sql` never migrates: it only reads) keeps the index in
# frame_index; before schema 7 with a list's facts on every row.
FRAMES_BEFORE_9 = _FRAMES.format(index="SELECT target, video, label, entry_key FROM frame_index")
FRAMES_BEFORE_7 = """
    SELECT i.dataset, i.list, i.video, i.label, c.sampling, c.shape, c.format, c.bytes,
           c.path AS clip_path, i.target, i.artifact
    FROM frame_index i JOIN frame_clips c USING (entry_key)"""


def index_select(sources: list[tuple[str, str]]) -> str:
    """(target, video, label, entry_key) of each (target, a FROM item reading that list's index file)."""
    if not sources:
        return "SELECT NULL::VARCHAR AS target, NULL::VARCHAR AS video, NULL::INTEGER AS label, " \
               "NULL::VARCHAR AS entry_key WHERE false"
    return "\n        UNION ALL ".join(f"SELECT '{quoted(target)}' AS target, video, label, entry_key FROM {source}"
                                      for target, source in sources)


def index_files(con: duckdb.DuckDBPyConnection, home: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(target, path under the home) of each current frame index that can be read, and the targets
    of those that cannot (no path, a file gone or outside the home's artifacts/, not an index), each
    with a warning."""
    rows = con.execute("SELECT target, path FROM frame_lists ORDER BY target").fetchall()
    usable, unusable = [], []
    with duckdb.connect() as probe:  # its own: an error inside the caller's transaction would end it
        for target, path in rows:
            try:
                readable = path is not None and _is_inside(home, path) and {"video", "label", "entry_key"} <= {
                    name for (name,) in probe.execute("SELECT name FROM parquet_schema(?)", [str(home / path)])
                    .fetchall()}
            except duckdb.Error:  # a damaged file
                readable = False
            if readable:
                usable.append((target, path))
            else:
                unusable.append(target)
                warnings.warn(f"the frame index of {target} ({path}) is gone, damaged or outside the home's "
                              "artifacts/: its rows are left out; rerun its `frames` to rebuild it")
    return usable, unusable


def refresh_frames(con: duckdb.DuckDBPyConnection, home: Path) -> None:
    """Redefine the stored `frames` view after frame_lists changed."""
    sources = [(target, f"read_parquet('{quoted(path)}')") for target, path in index_files(con, home)[0]]
    _store_view(con, "frames", _FRAMES.format(index=index_select(sources)), home)


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
            f"FROM read_parquet('{quoted(str(base / path if base else path))}')" for path, _ in files)


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
VIEW_NAMES = ("frames", *(view.name for view in FILE_VIEWS))


def refresh_stored(con: duckdb.DuckDBPyConnection, view: FileView, home: Path) -> None:
    """Redefine `view` in the catalog file after its table changed."""
    _store_view(con, view.name, view.select(view.files(con), None), home)


def _store_view(con: duckdb.DuckDBPyConnection, name: str, select: str, home: Path) -> None:
    """CREATE OR REPLACE the stored view `name` over paths relative to the home: DuckDB checks them as
    it binds the view, hence the search path, for this statement only."""
    con.execute("SET file_search_path = ?", [str(home)])
    try:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")
    finally:
        con.execute("RESET file_search_path")


def define_views(con: duckdb.DuckDBPyConnection, home: Path, named: Collection[str] = ()) -> None:
    """On a private copy of a catalog: drop every stored view and macro, and define the project's
    views from code over `home`'s own artifact files. Of the views a query names (`named`), the file
    views become tables and `frames` gets its lists' index columns as a temporary table, read now,
    before file access is switched off; `frames` unnamed is not defined (it would read every index)."""
    # Built-ins by their full names, objects by the database's: a stored macro shadows any unqualified
    # function (duckdb_functions itself), and its `internal` flag is the file's to set.
    db = con.execute("SELECT system.main.current_database()").fetchone()[0]
    for schema, name in con.execute("SELECT DISTINCT schema_name, view_name FROM system.main.duckdb_views() "
                                    "WHERE database_name = ?", [db]).fetchall():
        con.execute(f"DROP VIEW {_identifier(db)}.{_identifier(schema)}.{_identifier(name)}")
    # a stored macro named like a built-in (read_parquet) would run in its place below, files allowed
    macros = con.execute("SELECT DISTINCT schema_name, function_name, function_type "
                         "FROM system.main.duckdb_functions() WHERE database_name = ?", [db]).fetchall()
    for schema, name, kind in macros:
        con.execute(f"DROP MACRO {'TABLE ' if kind == 'table_macro' else ''}"
                    f"{_identifier(db)}.{_identifier(schema)}.{_identifier(name)}")
    tables = {t for (t,) in con.execute("SELECT table_name FROM system.main.duckdb_tables() "
                                        "WHERE database_name = ? AND schema_name = 'main'", [db]).fetchall()}
    if {"frame_index", "frame_clips"} <= tables:
        con.execute(f"CREATE VIEW frames AS {FRAMES_BEFORE_9 if 'frame_lists' in tables else FRAMES_BEFORE_7}")
    elif {"frame_lists", "frame_clips"} <= tables and "frames" in named:
        # The index columns only, read now while files may be read (~170 bytes a video); the join to
        # the clips stays lazy. One thread: each of DuckDB's Parquet readers holds its own buffers.
        sources = [(target, f"read_parquet('{quoted(str(home / path))}')")
                   for target, path in index_files(con, home)[0]]
        con.execute("SET threads = 1")
        con.execute(f"CREATE TEMP TABLE _frame_index AS {index_select(sources)}")
        con.execute("RESET threads")
        con.execute(f"CREATE VIEW frames AS {_FRAMES.format(index='FROM _frame_index')}")
    for view in FILE_VIEWS:
        registered = view.files(con) if view.table in tables else []
        kept = set(_inside(home, [path for path, _ in registered]))
        files = [(path, dim) for path, dim in registered if path in kept and isinstance(dim, int)]
        kind = "TABLE" if view.name in named else "VIEW"
        con.execute(f"CREATE {kind} {view.name} AS {view.select(files, home)}")


def _inside(home: Path, paths: list[str]) -> list[str]:
    """The registered files that are regular files under the home's artifacts/ (a received catalog
    may name any path)."""
    kept = []
    for path in paths:
        if _is_inside(home, path):
            kept.append(path)
        else:
            warnings.warn(f"the catalog names {path!r}, which is not a file under {home / 'artifacts'}: "
                          "its rows are left out")
    return kept


def _is_inside(home: Path, path: str) -> bool:
    try:
        full = (home / str(path)).resolve()
        return full.is_relative_to((home / "artifacts").resolve()) and full.is_file()
    except (OSError, ValueError, RuntimeError):  # no access, a NUL byte, a symlink loop
        return False


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quoted(text: str) -> str:
    """`text` inside a SQL string literal."""
    return text.replace("'", "''")
