"""The DuckDB catalog: short connections, retried while another process holds the file.

DuckDB lets one process write and then refuses every other process, readers included, so
connections live only as long as one transaction: a long stage never blocks `msta-pipe sql`.
Opening one costs ~20 ms (DuckDB builds its function catalog anew), so inside a `kept_open`
scope the transactions that follow each other share one instance, closed after a short idle.
"""
from __future__ import annotations

import hashlib
import math
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from cache.errors import UserError
from cache.lock import lock_wait_seconds
from cache.scratch import scratch_dir
from cache.schema import EMPTY_TEXT_EMBEDDINGS, MIGRATIONS, SCHEMA_VERSION
from cache.views import define_views, refresh_frames

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")
IDLE_SECONDS = 0.2  # a kept instance outlives its last use by this long: others' waits stay short
HOLD_SECONDS = 1.0  # and is let go between transactions once open this long, however often they come
# Rows per DuckDB row group written through the catalog (DuckDB's own: 122,880). Each commit that
# appends to a table rewrites its last, partly filled row group: registering 64 clips into a
# 240k-clip `frame_clips` cost up to one full group in memory, 270 MB against 151 MB at 16k
# clips; 8,192 bounds it (benchmarks/catalog_growth.py). DuckDB does not store the size in the file.
ROW_GROUP_ROWS = 8192


class _Kept:
    """One read-write DuckDB instance of a catalog file, shared by every Catalog of this process
    on that file while a `kept_open` scope lasts (DuckDB refuses a second, read-only instance of a
    file in the process that has it open). All state is guarded by _KEPT_LOCK."""

    def __init__(self) -> None:
        self.con: duckdb.DuckDBPyConnection | None = None
        self.users = 0
        self.scopes = 0
        self.last_used = 0.0
        self.opened = 0.0
        self.openings = 0  # which opening a watcher thread watches
        self.letting_go = 0  # let_go scopes: closed whenever unused

    def cursor(self, open_instance: Callable[[], duckdb.DuckDBPyConnection]) -> duckdb.DuckDBPyConnection:
        if self.con is None:
            self.con = open_instance()
            self.opened = time.monotonic()
            self.openings += 1
            # The watcher is told which opening, never given the connection: were it to drop the last
            # reference, the DuckDB instance would be torn down in that thread with the GIL released,
            # and an interpreter finalising meanwhile makes glibc abort the process (exit -6,
            # "FATAL: exception not rethrown", seen once in CI after a command's error).
            threading.Thread(target=self._close_when_idle, args=(self.openings,), daemon=True).start()
        self.users += 1
        return _use_catalog(self.con.cursor())  # a cursor starts on DuckDB's in-memory database

    def release(self) -> None:
        self.users -= 1
        self.last_used = time.monotonic()
        # A stage writing more often than the idle time would otherwise keep `msta-pipe sql` out.
        if self.users == 0 and (self.scopes == 0 or self.letting_go
                                or self.last_used - self.opened >= HOLD_SECONDS):
            self.close()

    def close(self) -> None:
        if self.con is not None:
            self.con.close()  # DuckDB checkpoints its write-ahead log here
            self.con = None

    def _close_when_idle(self, opening: int) -> None:
        while True:
            with _KEPT_LOCK:
                if self.con is None or self.openings != opening:  # closed already (the scope ended)
                    return
                idle = time.monotonic() - self.last_used
                if self.users == 0 and idle >= IDLE_SECONDS:
                    self.close()
                    return
                wait = IDLE_SECONDS - idle if self.users == 0 else IDLE_SECONDS
            time.sleep(wait)


_NAME = "catalog"  # what duckdb.connect would name catalog.duckdb: the same in users' SQL and ours


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """A connection to the catalog file attached with ROW_GROUP_ROWS (only ATTACH takes it).
    Connections of one process in one mode share a named in-memory instance, with the file
    attached once, as duckdb.connect(path) shares its instance: a second ATTACH of the file in
    the process would fail. DuckDB spills beside the file, not into the working directory."""
    full = str(path.resolve())
    name = f":memory:msta-{hashlib.sha256(full.encode()).hexdigest()[:16]}-{'ro' if read_only else 'rw'}"
    con = duckdb.connect(name, config={"temp_directory": full + ".tmp"})
    try:
        literal = full.replace("'", "''")
        con.execute(f"ATTACH IF NOT EXISTS '{literal}' AS {_NAME} "
                    f"(READ_ONLY {read_only}, ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
        return _use_catalog(con)
    except BaseException:
        con.close()
        raise


def _use_catalog(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    con.execute(f"USE {_NAME}")
    # No progress bar (a setting of each connection): DuckDB draws it on stdout, into a command's
    # output, once a statement runs 2 s (gc over 240k clips)
    con.execute("SET enable_progress_bar = false")
    return con


class CatalogBusy(UserError):
    """Another process held the catalog past the wait: work that can wait catches this (Deferred)."""


_KEPT: dict[Path, _Kept] = {}
_KEPT_LOCK = threading.RLock()
_MIGRATE_LOCK = threading.Lock()


class Catalog:
    def __init__(self, home: Path, wait_seconds: float | None = None) -> None:
        self.home = home
        self.path = home / "catalog.duckdb"
        self.wait_seconds = wait_seconds if wait_seconds is not None else lock_wait_seconds()
        self._migrated = False

    def exists(self) -> bool:
        return self.path.exists()

    def _open(self, read_only: bool, wait: float | None = None) -> duckdb.DuckDBPyConnection:
        """A connection, retried for `wait` seconds (default: the catalog's) while another process
        holds the file; with wait=math.inf it waits as long as that takes, saying so once."""
        wait = self.wait_seconds if wait is None else wait
        deadline = time.monotonic() + min(wait, self.wait_seconds)
        delay, said = 0.02, False
        while True:
            try:
                return _connect(self.path, read_only)
            except duckdb.IOException as exc:
                m = _LOCK_HOLDER.search(str(exc))
                if m is None:
                    raise UserError(f"cannot open the catalog {self.path}: {exc}", 1) from None
                holder = f"PID {m.group(2)}: {m.group(1)}"
                if time.monotonic() >= deadline and not math.isinf(wait):
                    raise CatalogBusy(
                        f"the catalog {self.path} is locked by another process ({holder}); close it "
                        "(a duckdb shell?) or wait, then run the command again", 1) from None
                if time.monotonic() >= deadline and not said:
                    warnings.warn(f"the catalog {self.path} is held by another process ({holder}): waiting "
                                  "for it to record finished work (close that process, or Ctrl-C and rerun later)")
                    said = True
                time.sleep(delay)
                delay = min(delay * 2, 0.25)

    @contextmanager
    def kept_open(self) -> Iterator[None]:
        """Within this scope (one writer's command: it holds the home's lock), transactions and reads
        that follow each other share one read-write instance. It closes IDLE_SECONDS after its last
        use, between two uses once open HOLD_SECONDS, and when the scope ends: a long stage still
        leaves the file to other processes."""
        key = self.path.resolve()
        with _KEPT_LOCK:
            kept = _KEPT.setdefault(key, _Kept())
            kept.scopes += 1
        try:
            yield
        finally:
            with _KEPT_LOCK:
                kept.scopes -= 1
                if kept.scopes == 0:
                    del _KEPT[key]
                    if kept.users == 0:  # else the last user, a thread still in a transaction, closes it
                        kept.close()

    @contextmanager
    def let_go(self) -> Iterator[None]:
        """Within a `kept_open` scope, a stage's own long work: the kept instance closes whenever no
        transaction uses it, as outside a scope (threads that overlap still share one opening).
        One instance living through a stage's thousands of clip registrations keeps what each
        reads: `frames` over 16k videos grew by 36 MB with it, 18 MB without. One open: ~20 ms."""
        with _KEPT_LOCK:
            kept = _KEPT.get(self.path.resolve())
            if kept is not None:
                kept.letting_go += 1
                if kept.users == 0:
                    kept.close()
        try:
            yield
        finally:
            if kept is not None:
                with _KEPT_LOCK:
                    kept.letting_go -= 1

    @contextmanager
    def _connection(self, read_only: bool, wait: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor on the kept instance inside a `kept_open` scope, else a connection of its own."""
        with _KEPT_LOCK:
            kept = _KEPT.get(self.path.resolve())
            if kept is not None:
                con = kept.cursor(lambda: self._open(read_only=False, wait=wait))
        if kept is None:
            con = self._open(read_only, wait)
        try:
            yield con
        finally:
            con.close()
            if kept is not None:
                with _KEPT_LOCK:
                    kept.release()

    @contextmanager
    def transaction(self, wait: float | None = None, on_commit: Callable[[], None] | None = None
                    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection for one transaction: committed on success, else rolled back.
        `wait`: how long another process's hold on the file is waited for (CatalogBusy after).
        `on_commit` runs right after the commit, with Ctrl-C held off between the two."""
        self.home.mkdir(parents=True, exist_ok=True)
        with self._connection(read_only=False, wait=wait) as con:
            if not self._migrated:
                with _MIGRATE_LOCK:  # threads of one process that find a new catalog create it once
                    self._migrate(con)
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                with _interrupts_held():
                    con.execute("COMMIT")
                    if on_commit is not None:
                        on_commit()
            except BaseException as exc:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass  # a failed COMMIT ended the transaction: its own error is the cause to report
                if isinstance(exc, (duckdb.IOException, duckdb.TransactionException)):  # a full disk, ...
                    raise UserError(f"cannot write the catalog {self.path}: {exc}", 1) from None
                raise

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self._require()
        with self._connection(read_only=True) as con:
            yield con

    def _require(self) -> None:
        if not self.exists():
            raise UserError(f"no catalog at {self.path}: run a stage first "
                            "(e.g. `msta-pipe describe`), or pass the right --home", 2)

    @contextmanager
    def snapshot(self) -> Iterator[Path]:
        """A private copy of the catalog file, for a user's SQL. It is taken under a read-only hold
        of the file (a writer waits as long as copying takes, never for a query) and deleted after, or by
        the next snapshot when this process is killed."""
        self._require()
        with scratch_dir("msta-sql-") as tmp:
            copy = tmp / self.path.name
            with self._connection(read_only=True):  # a shared hold: no writer changes the file meanwhile
                shutil.copyfile(self.path, copy)
                wal = self.path.with_name(self.path.name + ".wal")  # left by a killed writer
                if wal.exists():
                    shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
            yield copy

    def sandboxed_reader(self, copy: Path, named: Collection[str] = ()) -> duckdb.DuckDBPyConnection:
        """A connection to a snapshot on which DuckDB itself refuses every file and network access
        (COPY/EXPORT ... TO, even under EXPLAIN ANALYZE; IMPORT, ATTACH, read_csv of any path;
        INSTALL, LOAD and extension autoloading) and any change of settings. Its views are defined
        from code (cache.views), never taken from the file, for the views the query names (`named`)."""
        con = duckdb.connect(str(copy), config={"autoinstall_known_extensions": False,
                                                "autoload_known_extensions": False,
                                                "allow_community_extensions": False})
        con.execute("SET enable_progress_bar = false")  # its bar would garble the output
        # the copy is thrown away: checkpointing it at close (the dropped views, a temporary table)
        # cost +114 MB at 240k videos (benchmarks/catalog_growth.py)
        con.execute("PRAGMA disable_checkpoint_on_shutdown")
        define_views(con, self.home, named)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")  # last: no statement may undo the above
        return con

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
            if v == 8:
                refresh_frames(con, self.home)
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", [str(v + 1)])
            con.execute("COMMIT")
        self._migrated = True


class Deferred:
    """Rows a long stage records as it goes (a training's epochs, the clips `frames` has cached).
    While another process holds the catalog they wait in memory for the next write instead of
    failing the stage: what they describe is already safe on disk (a checkpoint, a clip file).
    `flush`, when the work is done, waits for the catalog as long as that takes."""

    def __init__(self, catalog: Catalog, write: Callable[[duckdb.DuckDBPyConnection, list[Any]], None],
                 wait: float = 1.0, batch: int = 1) -> None:
        self.catalog, self.write, self.wait, self.batch = catalog, write, wait, batch
        self.pending: list[Any] = []
        self._said = False

    def add(self, rows: Sequence[Any]) -> None:
        """Record `rows` now if `batch` rows are waiting, else with a later call."""
        self.pending.extend(rows)
        if len(self.pending) < self.batch:
            return
        try:
            self._write(self.wait)
        except CatalogBusy as exc:
            if not self._said:
                warnings.warn(f"{str(exc).split(';')[0]}: the work goes on, and is recorded once it is free")
                self._said = True

    def flush(self) -> None:
        self._write(math.inf)

    def _write(self, wait: float) -> None:
        if self.pending:
            rows = self.pending

            def committed() -> None:  # at once: a Ctrl-C while the connection closes must not write them again
                self.pending = self.pending[len(rows):]

            with self.catalog.transaction(wait=wait, on_commit=committed) as con:
                self.write(con, rows)


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT (Ctrl-C) is delivered after the block, not inside it; elsewhere than in the main
    thread of a POSIX process, where Python takes no signal anyway, this does nothing."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


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
