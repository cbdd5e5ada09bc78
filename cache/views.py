"""Views over artifact files, rebuilt whenever the files they read change.

Parquet `fixed_size_list<float32>[D]` reads back in DuckDB as `FLOAT[]`; the cast to `FLOAT[D]`
is what makes `array_cosine_similarity` usable in plain SQL.
"""
from __future__ import annotations

from pathlib import Path

import duckdb

from cache.schema import EMPTY_TEXT_EMBEDDINGS

# Views that read artifact files rather than tables (`msta-pipe sql` materialises them, see Catalog).
FILE_VIEWS = ("text_embeddings", "video_embeddings")


def refresh_text_embeddings(con: duckdb.DuckDBPyConnection, home: Path) -> None:
    files = con.execute("SELECT path, dim FROM text_embedding_files ORDER BY dataset, backbone").fetchall()
    if not files:
        con.execute(EMPTY_TEXT_EMBEDDINGS)
        return
    con.execute("CREATE OR REPLACE VIEW text_embeddings AS " + _union(
        files, home, "dataset, backbone, level, class_id, class_name, kind, idx, text, text_sha256"))


def refresh_video_embeddings(con: duckdb.DuckDBPyConnection, home: Path) -> None:
    """Called when a features run registers a file, so the view never reads none."""
    files = con.execute("SELECT path, dim FROM video_embedding_files ORDER BY target").fetchall()
    con.execute("CREATE OR REPLACE VIEW video_embeddings AS " + _union(
        files, home, "dataset, list, model, run_key, selection, backbone, video, label, class_name, level, view, "
                     "clip, crop"))


def _union(files: list[tuple[str, int]], home: Path, columns: str) -> str:
    """One SELECT over Parquet files (path under the home, embedding width) with `embedding` cast to FLOAT[D]."""
    dims = {d for _, d in files}
    cast = f"FLOAT[{dims.pop()}]" if len(dims) == 1 else "FLOAT[]"  # mixed widths cannot share one array type
    return "\nUNION ALL\n".join(f"SELECT {columns}, embedding::{cast} AS embedding "
                                 f"FROM read_parquet('{_quote(home / path)}')" for path, _ in files)


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")
