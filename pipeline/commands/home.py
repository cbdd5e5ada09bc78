"""The commands about the home itself: `status` (what is fresh, stale or failed), `sql` (read-only
queries over the catalog) and `gc` (deleting what no catalog row reaches)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from cache.errors import UserError, error_line, one_line, printable
from pipeline.commands import session

STALE_EXIT = 3  # `status`: something is stale or interrupted, nothing failed


def status_command(home: Path | None) -> None:
    """Exit code: 0 all fresh (or missing), STALE_EXIT something stale and nothing failed, 1 something failed."""
    import json

    from stages.engine.stage import Request

    runner = session.make_runner(home)
    if not runner.catalog.exists():
        typer.echo(f"no catalog at {runner.catalog.path}: nothing has run yet")
        return
    with runner.catalog.reader() as con:
        rows = con.execute("""SELECT target, arg_max(request, started_at) FROM runs
                              GROUP BY target HAVING arg_max(status, started_at) <> 'cleared'
                                  OR bool_or(status = 'done')
                              ORDER BY min(started_at)""").fetchall()
        datasets = [r[0] for r in con.execute("SELECT DISTINCT dataset FROM classes ORDER BY 1").fetchall()]
    seen = {t for t, _ in rows}
    lines = []
    states: set[str] = set()
    for target, request in session.progress(rows, "status", unit="target"):
        ev = runner.freshness(Request.from_json(json.loads(request)))
        states.add(ev.state)
        lines.append((target, ev.state, ev.reason))
    for ds in datasets:
        for kind in ("spatial", "temporal"):
            if f"describe:{ds}:{kind}" not in seen:
                lines.append((f"describe:{ds}:{kind}", "missing", "never run"))
    width = max(len(t) for t, _, _ in lines) if lines else 10
    for target, state, reason in lines:
        typer.echo(f"{target:<{width}}  {state:<8} {reason}".rstrip())
    if "failed" in states:
        raise typer.Exit(1)
    if "stale" in states:
        raise typer.Exit(STALE_EXIT)


def sql_command(query: str, fmt: str, timeout: float, home: Path | None) -> None:
    import duckdb

    from cache.catalog import Catalog
    from cache.views import VIEW_NAMES

    if fmt not in ("table", "csv", "json"):
        raise UserError("--format must be table, csv or json", 2)
    if not timeout > 0:
        raise UserError(f"--timeout must be a number of seconds above 0, got {timeout}", 2)
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise UserError(f"cannot parse the query: {exc}", 2) from None
    allowed = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.PRAGMA}
    refused = [s.type.name for s in statements if s.type not in allowed]
    if refused:
        raise UserError(f"`msta-pipe sql` is read-only: {', '.join(refused)} statements are refused", 2)
    if not statements:
        raise UserError("the query is empty", 2)
    views = [name for name in VIEW_NAMES if name in query.lower()]
    catalog = Catalog(session.home_dir(home))
    with catalog.snapshot() as copy:
        outcome = _in_child(catalog, copy, query, views, timeout)
    if outcome[0] == "refused":  # what the sandbox refuses (files, network, extensions, settings) is bad input
        raise UserError(f"`msta-pipe sql` reads the catalog only (no files, extensions or settings): {outcome[1]}", 2)
    if outcome[0] == "failed":
        raise UserError(f"query failed: {outcome[1]}", 1)
    session.print_rows(*outcome[1:], fmt)


def _in_child(catalog: Any, copy: Path, query: str, views: list[str], timeout: float) -> tuple[Any, ...]:
    """Run the query in a child process, which Ctrl-C and the time limit end at once: DuckDB ignores
    Python's signal handling while it works, and an interrupted DuckDB connection cannot be closed."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_query, args=(send, catalog, copy, query, views, os.getpid()), daemon=True)
    child.start()
    send.close()
    deadline = time.monotonic() + timeout
    try:
        while not receive.poll(0.1):
            if not child.is_alive():
                raise UserError(f"the query ended its process (exit {child.exitcode}) with no answer", 1)
            if time.monotonic() >= deadline:
                raise UserError(f"the query ran past --timeout {timeout:g} s and was stopped; "
                                "raise --timeout to let it run longer", 1)
        return receive.recv()
    except KeyboardInterrupt:
        raise UserError("the query was interrupted", 130) from None
    finally:
        child.kill()
        child.join()


def _follow(parent: int) -> None:
    """End this child when its parent ends, even by kill -9: else an hours-long query would run on
    as an orphan. Linux kills it (PR_SET_PDEATHSIG); elsewhere a thread watches, DuckDB leaving
    the GIL free while it works."""
    import ctypes
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent ended before the request took hold
        os._exit(1)


def _query(send: Any, catalog: Any, copy: Path, query: str, views: list[str], parent: int) -> None:
    """The child: ("ok", names, rows), ("refused", line) or ("failed", line) through `send`."""
    import signal

    import duckdb

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (Ctrl-C reaches the whole group)
    _follow(parent)
    try:
        con = catalog.sandboxed_reader(copy, views)
        statements = duckdb.extract_statements(query)
        for stmt in statements[:-1]:
            con.execute(stmt)
        cur = con.execute(statements[-1])
        names = [d[0] for d in cur.description] if cur.description else []
        send.send(("ok", names, cur.fetchall() if names else []))
    except duckdb.Error as exc:
        msg = one_line(str(exc))
        refused = (isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in msg
                   or (isinstance(exc, duckdb.CatalogException) and " extension" in msg))
        send.send(("refused" if refused else "failed", msg))
    except Exception as exc:  # never a traceback from the child
        send.send(("failed", error_line(exc)))


def gc_command(dry_run: bool, superseded: bool, failed: bool, home: Path | None) -> None:
    from cache.gc import collect

    runner = session.make_runner(home)
    if not runner.catalog.exists():
        typer.echo("nothing to collect: no catalog yet")
        return
    if dry_run:
        report = collect(runner.catalog, runner.store, superseded=superseded, dry_run=True, failed=failed)
    else:
        with session.writing(home):
            report = collect(runner.catalog, runner.store, superseded=superseded, dry_run=False, failed=failed)
    verb = "would delete" if dry_run else "deleted"
    for path, why in report.notes:
        typer.echo(f"{verb} {path}: {why}")
    for target, key in report.superseded:
        typer.echo(f"{verb} superseded run {key[:16]} of {target}")
    for target, key in report.cleared:
        typer.echo(f"{'would clear' if dry_run else 'cleared'} failed run {key[:16]} of {target}")
    typer.echo(f"{verb} {report.files} files ({report.bytes / 1e6:.1f} MB) and {report.rows} catalog rows")
    if report.foreign:
        typer.echo(f"left {len(report.foreign)} files msta-pipe did not write under artifacts/ and runs/ "
                   f"(e.g. {', '.join(report.foreign[:3])}): move them out of the home's managed folders")
    if report.unreadable_indexes:
        lists = printable(", ".join(report.unreadable_indexes[:3]))  # targets a received catalog may have named
        typer.echo(f"kept every cached clip: the frame index of {lists} cannot be read, so its clips cannot be "
                   "told from unused ones; rerun its `frames` to rebuild it")

