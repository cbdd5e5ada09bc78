"""The DuckDB catalog: short connections, retried while another process holds the file.

DuckDB lets one process write and then refuses every other process, readers included, so
connections live only as long as one transaction: a long stage never blocks `msta-pipe sql`.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from cache.errors import UserError
from cache.lock import lock_wait_seconds
from cache.schema import EMPTY_TEXT_EMBEDDINGS, MIGRATIONS, SCHEMA_VERSION

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")


class Catalog:
    def __init__(self, home: Path, wait_seconds: float | None = None) -> None:
        self.home = home
        self.path = home / "catalog.duckdb"
        self.wait_seconds = wait_seconds if wait_seconds is not None else lock_wait_seconds()
        self._migrated = False

    def exists(self) -> bool:
        return self.path.exists()

    def _open(self, read_only: bool, config: Mapping[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.02
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only, config=dict(config or {}))
            except duckdb.IOException as exc:
                m = _LOCK_HOLDER.search(str(exc))
                if m is None:
                    raise UserError(f"cannot open the catalog {self.path}: {exc}", 1) from None
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"the catalog {self.path} is locked by another process "
                        f"(PID {m.group(2)}: {m.group(1)}); close it (a duckdb shell?) or wait, "
                        "then run the command again", 1) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection for one transaction: committed on success, else rolled back."""
        self.home.mkdir(parents=True, exist_ok=True)
        con = self._open(read_only=False)
        try:
            if not self._migrated:
                self._migrate(con)
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException as exc:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass  # a failed COMMIT ended the transaction: its own error is the cause to report
                if isinstance(exc, (duckdb.IOException, duckdb.TransactionException)):  # a full disk, ...
                    raise UserError(f"cannot write the catalog {self.path}: {exc}", 1) from None
                raise
        finally:
            con.close()

    @contextmanager
    def reader(self, config: Mapping[str, Any] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.exists():
            raise UserError(f"no catalog at {self.path}: run a stage first "
                            "(e.g. `msta-pipe describe`), or pass the right --home", 2)
        con = self._open(read_only=True, config=config)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def sandboxed_reader(self, file_views: Sequence[str] = ()) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for a user's SQL on which DuckDB itself refuses every file and
        network access (COPY/EXPORT ... TO, even under EXPLAIN ANALYZE; IMPORT, ATTACH, read_csv of
        any path; INSTALL, LOAD and extension autoloading) and any change of settings.

        `file_views` (views over artifact Parquet files, e.g. text_embeddings) are first copied into
        temporary tables of the same name, which shadow the views: their files become unreadable, and
        DuckDB's allowed_directories would also let COPY overwrite the artifacts."""
        with self.reader(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                 "allow_community_extensions": False}) as con:
            for view in file_views:
                con.execute(f"CREATE TEMP TABLE {view} AS FROM main.{view}")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")  # last: no statement may undo the above
            yield con

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        has_meta = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()[0]
        version = 0
        if has_meta:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise UserError(f"the catalog {self.path} has schema version {version}, newer than this "
                            f"msta-pipe knows ({SCHEMA_VERSION}); upgrade msta-pipe", 2)
        for v in range(version, SCHEMA_VERSION):
            con.execute("BEGIN TRANSACTION")
            con.execute(MIGRATIONS[v])
            if v == 0:
                con.execute(EMPTY_TEXT_EMBEDDINGS)
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", [str(v + 1)])
            con.execute("COMMIT")
        self._migrated = True


def utcnow() -> datetime:
    """The catalog's timestamps: UTC, stored naive (DuckDB TIMESTAMP)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Mapping[str, Any]],
                conflict: str = "") -> None:
    """Insert records by column name through Arrow: one statement however many rows (DuckDB's
    executemany goes row by row), columns left out take their default. `conflict`: "",
    "OR REPLACE" or "OR IGNORE"."""
    if not rows:
        return
    import pyarrow as pa

    con.register("_incoming_rows", pa.Table.from_pylist(list(rows)))
    try:
        con.execute(f"INSERT {conflict} INTO {table} BY NAME SELECT * FROM _incoming_rows")
    finally:
        con.unregister("_incoming_rows")


def rows_as_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None
                  ) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]
