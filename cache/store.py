"""Content-addressed files under `<home>/artifacts`, written atomically.

A file is written to a temporary name in its destination folder, fsynced, then renamed over
the final name; only after that is it registered in the catalog. A crash therefore leaves at
worst an orphan temporary (removed by `gc`) or an unregistered file (rewritten by the rerun).
"""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from cache.keys import canonical_json, sha256_bytes, sha256_file

TMP_PREFIX = ".tmp-"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write() on a full disk names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


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

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.home))

    def absolute(self, relative: str) -> Path:
        return self.home / relative
