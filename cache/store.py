"""Content-addressed files under `<home>/artifacts`, written atomically.

A file is written to a temporary name in its destination folder, fsynced, then renamed over
the final name; only after that is it registered in the catalog. A crash therefore leaves at
worst an orphan temporary (removed by `gc`) or an unregistered file (rewritten by the rerun).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from cache.keys import canonical_json

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
    table = table.replace_schema_metadata(None).combine_chunks()  # zero-copy when already one chunk
    sink = _HashSink()  # the IPC stream is hashed as it is written, never held: memory stays one table
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.sha.hexdigest()


class _HashSink:
    """A write-only file object that only hashes what it is given."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        self.sha.update(data)
        return len(memoryview(data))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


# Rows per Parquet row group: readers that stream a file (`frames`' check, the loaders) hold one
# group at a time, so a Kinetics-sized index is never decoded whole.
ROW_GROUP = 2048


def _provenance_metadata(schema: pa.Schema, provenance: Mapping[str, Any]) -> dict[bytes, bytes]:
    meta = dict(schema.metadata or {})
    meta.update({f"msta.{k}".encode(): canonical_json(v).encode() for k, v in provenance.items()})
    return meta


def write_parquet(path: Path, table: pa.Table, provenance: Mapping[str, Any]) -> None:
    """Parquet with the producing stage's provenance as schema metadata (JSON values), written
    straight into the atomic temporary (no second copy of the file in memory)."""
    table = table.replace_schema_metadata(_provenance_metadata(table.schema, provenance))
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP))


class TableSink:
    """A table too long to hold in memory (a Kinetics list's index): its batches go to a temporary
    Parquet file beside the artifacts and into a running digest, the sha256 of their Arrow IPC
    stream. Like `table_digest`, it covers schema and values only; unlike it, it follows the
    batches as written, so the same rows written in the same batches have the same digest."""

    def __init__(self, folder: Path, schema: pa.Schema) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + "rows.", suffix=".parquet", dir=folder)  # gc's to collect
        os.close(fd)
        self.tmp, self.schema, self.num_rows = Path(tmp), schema, 0
        self._parquet: pq.ParquetWriter | None = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self._hash = _HashSink()
        self._ipc = ipc.new_stream(self._hash, schema)
        self._digest: str | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        assert self._parquet is not None, "the sink is finished"
        self._parquet.write_batch(batch, row_group_size=ROW_GROUP)
        self._ipc.write_batch(batch)
        self.num_rows += batch.num_rows

    def finish(self) -> str:
        """The digest, once every batch is written (no `write` after it)."""
        if self._digest is None:
            self._close()
            self._digest = self._hash.sha.hexdigest()
        return self._digest

    def save(self, path: Path, provenance: Mapping[str, Any]) -> None:
        """The rows at `path` (atomically) with `provenance` as schema metadata, one row group in
        memory at a time; the temporary goes."""
        self.finish()
        source = pq.ParquetFile(self.tmp)
        schema = self.schema.with_metadata(_provenance_metadata(self.schema, provenance))

        def write(f: Any) -> None:
            with pq.ParquetWriter(f, schema, compression="zstd") as out:
                for i in range(source.num_row_groups):
                    out.write_table(source.read_row_group(i).replace_schema_metadata(schema.metadata))

        try:
            atomic_write(path, write)
        finally:
            source.close()
        self.tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._ipc.close()
            self._parquet = None

    @contextmanager
    def discarded_on_error(self) -> Iterator[TableSink]:
        """The scope of the writing: an error or Ctrl-C inside it deletes the temporary."""
        try:
            yield self
        except BaseException:
            self.discard()
            raise


class Store:
    """Paths of the home's files: artifacts by kind and digest, per-run working folders."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.artifacts = home / "artifacts"

    def artifact_path(self, kind: str, digest: str, ext: str) -> Path:
        return self.artifacts / kind / digest[:2] / f"{digest}{ext}"

    def table_sink(self, kind: str, schema: pa.Schema) -> TableSink:
        return TableSink(self.artifacts / kind, schema)

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
