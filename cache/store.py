"""Content-addressed files under `<home>/artifacts`, written atomically.

A file is written to a temporary name in its destination folder, fsynced, then renamed over
the final name; only after that is it registered in the catalog. A crash therefore leaves at
worst an orphan temporary (removed by `gc`) or an unregistered file (rewritten by the rerun).
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from cache.keys import canonical_json, sha256_bytes

# The one atomic writer and file digest, shared with the model package (which imports nothing of
# cache/); re-exported here so that the engine and the stages reach files through cache/ alone.
from msta.fileio import TMP_PREFIX as TMP_PREFIX
from msta.fileio import atomic_write as atomic_write
from msta.fileio import atomic_write_bytes as atomic_write_bytes
from msta.fileio import sha256_file as sha256_file


def table_digest(table: pa.Table) -> str:
    """Digest of a table's logical content: schema and values, not file bytes or metadata.

    Provenance lives in the Parquet metadata and differs between runs that produce the same
    rows; downstream keys must not change in that case.
    """
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sha256_bytes(sink.getvalue())


def write_parquet(path: Path, table: pa.Table, provenance: Mapping[str, Any]) -> None:
    """Parquet with the producing stage's provenance as schema metadata (JSON values)."""
    meta = dict(table.schema.metadata or {})
    meta.update({f"msta.{k}".encode(): canonical_json(v).encode() for k, v in provenance.items()})
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())


class Store:
    """Paths of the home's files: artifacts by kind and digest, per-run working folders."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.artifacts = home / "artifacts"

    def artifact_path(self, kind: str, digest: str, ext: str) -> Path:
        return self.artifacts / kind / digest[:2] / f"{digest}{ext}"

    def run_dir(self, key: str) -> Path:
        return self.home / "runs" / key[:16]

    def verify(self, path: Path, file_sha256: str) -> bool:
        """A registered artifact counts only if its file exists with the registered bytes."""
        try:
            return sha256_file(path) == file_sha256
        except FileNotFoundError:
            return False

    def manages(self, path: Path) -> bool:
        """Whether `path` lies in a folder whose files `gc` collects (artifacts/, runs/)."""
        path = path.resolve()
        return any(path.is_relative_to((self.home / folder).resolve()) for folder in ("artifacts", "runs"))

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.home))

    def absolute(self, relative: str) -> Path:
        return self.home / relative
