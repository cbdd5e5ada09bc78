"""Resolves a request tree like make: upstream first, skip what is fresh, run what is stale.

Key of a run = sha256 of canonical JSON {stage, code_version, params, inputs: {name: digest}}.
Inputs are named by the digest of their content (an upstream artifact's logical digest or a
file's sha256), so an upstream rerun that yields identical content invalidates nothing.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.catalog import Catalog, CatalogBusy, insert_rows, rows_as_dicts, utcnow
from cache.errors import UserError, error_line, one_line
from cache.keys import canonical_json, digest_value, plain_json, sha256_bytes
from cache.lock import HomeLock
from cache.store import Store, atomic_write_bytes, sha256_file, table_digest, write_parquet
from stages.engine.stage import (
    Artifact,
    Context,
    FileDigest,
    FileInput,
    Output,
    Request,
    Resolved,
    Stage,
    StageFailed,
)

StageTable = Callable[[str], Stage]  # stage name -> its implementation, supplied by the app layer


@dataclass
class Freshness:
    """Freshness of one request as of now, without running anything."""
    request: Request
    target: str
    state: str  # fresh | stale | missing | failed
    reason: str = ""
    key: str | None = None
    artifact: Artifact | None = None
    upstream: list["Freshness"] = field(default_factory=list)


class Runner:
    def __init__(self, home: Path, stages: StageTable, options: Mapping[str, Any] | None = None,
                 echo: Callable[[str], None] = print) -> None:
        self.home = home
        self._stage_table = stages
        self._stages: dict[str, Stage] = {}
        self.catalog = Catalog(home)
        self.store = Store(home)
        self.options = dict(options or {})
        self.echo = echo
        self._file_memo: dict[tuple[str, int, int], str] = {}
        self._said_fresh: set[str] = set()

    # -- digests of inputs -------------------------------------------------------------
    def file_digest(self, path: Path) -> str:
        """sha256 of a file, memoised on (path, size, mtime) in the catalog: weights are large."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UserError(f"input file {path} does not exist", 2) from None
        if path.is_dir():
            raise UserError(f"input file {path} is a directory, not a file", 2)
        memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if memo_key in self._file_memo:
            return self._file_memo[memo_key]
        digest = None
        if self.catalog.exists() and st.st_size > (8 << 20):
            with self.catalog.reader() as con:
                row = con.execute("SELECT sha256 FROM file_digests WHERE path=? AND size=? AND mtime_ns=?",
                                  list(memo_key)).fetchone()
            digest = row[0] if row else None
        if digest is None:
            digest = sha256_file(path)
            if st.st_size > (8 << 20):
                try:
                    with self.catalog.transaction() as con:
                        insert_rows(con, "file_digests", [{"path": memo_key[0], "size": memo_key[1],
                                                           "mtime_ns": memo_key[2], "sha256": digest}], "OR REPLACE")
                except CatalogBusy:
                    pass  # a memo only: the next run reads the file again
        self._file_memo[memo_key] = digest
        return digest

    def stage(self, name: str) -> Stage:
        if name not in self._stages:
            self._stages[name] = self._stage_table(name)
        return self._stages[name]

    def upstream_targets(self, req: Request) -> dict[str, str]:
        return {name: self.target(inp) for name, inp in req.inputs.items() if isinstance(inp, Request)}

    def target(self, req: Request) -> str:
        return self.stage(req.stage).target(req, self.upstream_targets(req))

    def key_of(self, req: Request, input_digests: Mapping[str, str]) -> str:
        stage = self.stage(req.stage)
        return digest_value({"stage": req.stage, "code_version": stage.code_version,
                             "params": dict(req.params), "inputs": dict(input_digests)})

    def resolve_inputs(self, req: Request, upstream: Callable[[Request], Artifact | str],
                       missing_file_blocks: bool = False) -> tuple[dict[str, Resolved], dict[str, str], str]:
        """(resolved inputs, their digests by name, why one is not there yet or ""): a file by its
        content digest, an upstream request by `upstream` (its artifact, or why there is none). A
        missing file raises, or with `missing_file_blocks` only blocks."""
        resolved: dict[str, Resolved] = {}
        digests: dict[str, str] = {}
        blocked = ""
        for name, inp in req.inputs.items():
            if isinstance(inp, FileInput):
                if missing_file_blocks and not inp.path.exists():
                    blocked = blocked or f"input {name} ({inp.path}) is missing"
                    continue
                digests[name] = self.file_digest(inp.path)
                resolved[name] = FileDigest(inp.path, digests[name])
            else:
                art = upstream(inp)
                if isinstance(art, str):
                    blocked = blocked or art
                    continue
                resolved[name], digests[name] = art, art.digest
        return resolved, digests, blocked

    # -- freshness ---------------------------------------------------------------------
    def freshness(self, req: Request) -> Freshness:
        stage = self.stage(req.stage)
        target = self.target(req)
        upstream: list[Freshness] = []

        def fresh_upstream(inp: Request) -> Artifact | str:
            ev = self.freshness(inp)
            upstream.append(ev)
            return ev.artifact if ev.state == "fresh" and ev.artifact else f"upstream {ev.target} is {ev.state}"

        _, digests, blocked = self.resolve_inputs(req, fresh_upstream, missing_file_blocks=True)
        if blocked:
            return Freshness(req, target, "stale", blocked, upstream=upstream)
        key = self.key_of(req, digests)
        artifact = self._done_artifact(key)
        if artifact is not None:
            changed = stage.check(artifact, self.home)
            if not changed:
                return Freshness(req, target, "fresh", key=key, artifact=artifact, upstream=upstream)
            return Freshness(req, target, "stale", changed, key=key, upstream=upstream)
        state, reason = self._why_not_fresh(req, target, key, digests)
        return Freshness(req, target, state, reason, key=key, upstream=upstream)

    def _done_artifact(self, key: str) -> Artifact | None:
        """The artifact of a done run with this key, if its file is intact (else: a miss)."""
        if not self.catalog.exists():
            return None
        with self.catalog.reader() as con:
            rows = rows_as_dicts(con, """
                SELECT a.* FROM runs r JOIN artifacts a ON a.digest = r.output
                WHERE r.key = ? AND r.status = 'done' ORDER BY r.finished_at DESC LIMIT 1""", [key])
        if not rows:
            return None
        row = rows[0]
        path = self.store.absolute(row["path"])
        if not self.store.verify(path, row["file_sha256"]):
            return None
        return Artifact(row["digest"], row["kind"], path, json.loads(row["meta"] or "{}"))

    def _why_not_fresh(self, req: Request, target: str, key: str,
                       digests: Mapping[str, str]) -> tuple[str, str]:
        if not self.catalog.exists():
            return "missing", "never run"
        with self.catalog.reader() as con:
            rows = rows_as_dicts(con, """
                SELECT key, code_version, params, inputs, status, error, pid FROM runs
                WHERE target = ? ORDER BY started_at DESC""", [target])
        if not rows:
            return "missing", "never run"
        latest = rows[0]
        if latest["key"] == key and latest["status"] == "failed":
            return "failed", f"last run failed: {one_line(latest['error'] or '')}"  # older rows hold tracebacks
        if latest["key"] == key and latest["status"] == "running":
            alive = HomeLock(self.home).holder() == latest["pid"]
            return "stale", "running now" if alive else "interrupted (process gone); rerun resumes it"
        done = [r for r in rows if r["status"] == "done"]
        if not done:
            return "missing", f"no completed run (last: {latest['status']})"
        if any(r["key"] == key for r in done):
            return "stale", "artifact file missing or modified"
        return "stale", describe_difference(self.stage(req.stage).code_version, req.params, digests,
                                            done[0])

    # -- execution ---------------------------------------------------------------------
    def materialise(self, req: Request, force: bool = False, dry_run: bool = False) -> Artifact | None:
        """Make `req`'s artifact exist, running stale upstream stages first.

        With dry_run, prints what would run and returns None for anything not already fresh.
        """
        if dry_run:  # reads only, maybe of a home this process may not write
            return self._materialise(req, force, dry_run)
        with self.catalog.kept_open():  # the many short transactions between stages share one instance
            return self._materialise(req, force, dry_run)

    def _materialise(self, req: Request, force: bool, dry_run: bool) -> Artifact | None:
        stage = self.stage(req.stage)
        target = self.target(req)
        resolved, digests, pending = self.resolve_inputs(
            req, lambda inp: self._materialise(inp, force=False, dry_run=dry_run) or "pending")
        ctx = Context(self.home, self.catalog, self.store, self.options, self.echo,
                      target=target, upstream=self.upstream_targets(req))
        if pending:
            self.echo(f"would run {target} (after its upstream)")
            plan = stage.plan(req, None, ctx)
            if plan:
                self.echo(f"  {plan}")
            return None
        key = self.key_of(req, digests)
        changed = ""
        if not force:
            artifact = self._done_artifact(key)
            if artifact is not None:
                changed = stage.check(artifact, self.home)
                if not changed:
                    if target not in self._said_fresh:  # shared upstream stages are visited often
                        self._said_fresh.add(target)
                        self.echo(f"fresh  {target}")
                    return artifact
        if dry_run:
            reason = "--force" if force else changed or self._why_not_fresh(req, target, key, digests)[1]
            self.echo(f"would run {target} ({reason})")
            plan = stage.plan(req, resolved, ctx)
            if plan:
                self.echo(f"  {plan}")
            return None
        ctx.forced = force
        return self._execute(req, stage, target, key, resolved, digests, ctx)

    def follow(self, req: Request, force: bool = False) -> Artifact | None:
        """What a non-zero rank of a torchrun launch does: run the stage's work beside rank 0 on the
        inputs rank 0 has materialised, writing nothing (rank 0 alone registers the result; the
        stage returns no output on such a rank)."""
        ev = self.freshness(req)
        if ev.state == "fresh" and not force:
            return ev.artifact

        def from_rank0(inp: Request) -> Artifact:
            up = self.freshness(inp)
            if up.artifact is None:
                raise UserError(f"rank 0 did not materialise {up.target} ({up.reason})", 1)
            return up.artifact

        resolved, digests, _ = self.resolve_inputs(req, from_rank0)
        key = self.key_of(req, digests)
        ctx = Context(self.home, self.catalog, self.store, self.options, lambda s: None, run_id="", key=key,
                      forced=force, target=ev.target, upstream=self.upstream_targets(req))
        self.stage(req.stage).run(req, resolved, ctx)
        return None

    def _execute(self, req: Request, stage: Any, target: str, key: str,
                 resolved: Mapping[str, Resolved], digests: Mapping[str, str], ctx: Context) -> Artifact:
        run_id = uuid.uuid4().hex
        ctx.run_id, ctx.key = run_id, key
        started = time.perf_counter()
        with self.catalog.transaction() as con:
            con.execute("""INSERT INTO runs (run_id, key, stage, target, configuration, code_version, params,
                           locators, inputs, request, status, started_at, pid)
                           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)""",
                        [run_id, key, req.stage, target, stage.configuration(req, ctx.upstream), stage.code_version,
                         plain_json(dict(req.params)), json.dumps(dict(req.locators), default=str),
                         canonical_json(dict(digests)), json.dumps(req.to_json(), default=str),
                         utcnow(), os.getpid()])
        self.echo(f"run    {target}")
        try:
            with self.catalog.let_go():
                output = stage.run(req, resolved, ctx)
            if output is None:
                raise RuntimeError(f"stage {req.stage} returned no artifact on rank 0")
            return self._register(run_id, output, key, req, status="done", error=None,
                                  seconds=time.perf_counter() - started)
        except StageFailed as exc:
            # sibling handlers below do not see what this one raises
            if exc.output is not None:
                self._register(run_id, exc.output, key, req, status="failed", error=one_line(str(exc)),
                               seconds=time.perf_counter() - started)
            else:
                self._fail(run_id, one_line(str(exc)), started)
            raise UserError(f"{target}: {exc}", 1) from None
        except BaseException as exc:
            # One scrubbed line, never a traceback: it is shown by `status` and may hold a key.
            self._fail(run_id, error_line(exc), started)
            raise

    def _fail(self, run_id: str, error: str, started: float) -> None:
        with self.catalog.transaction(wait=math.inf) as con:  # the outcome of work done: worth the wait
            con.execute("UPDATE runs SET status='failed', error=?, finished_at=?, seconds=? WHERE run_id=?",
                        [error, utcnow(), time.perf_counter() - started, run_id])

    def _register(self, run_id: str, output: Output, key: str, req: Request, status: str,
                  error: str | None, seconds: float) -> Artifact:
        """Write the artifact file atomically, then register it with the run in one transaction."""
        provenance = {"stage": req.stage, "key": key, "params": dict(req.params)}
        if output.table is not None:
            digest = table_digest(output.table)
            path = self.store.artifact_path(output.kind, digest, output.ext or ".parquet")
            write_parquet(path, output.table, {**provenance, **output.meta})
        elif output.rows is not None:
            digest = output.rows.finish()
            path = self.store.artifact_path(output.kind, digest, ".parquet")
            output.rows.save(path, {**provenance, **output.meta})
        elif output.data is not None:
            digest = sha256_bytes(output.data)
            path = self.store.artifact_path(output.kind, digest, output.ext)
            atomic_write_bytes(path, output.data)
        elif output.file is not None:
            digest = output.digest or sha256_file(output.file)
            path = self.store.artifact_path(output.kind, digest, output.ext or output.file.suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(output.file, path)
        else:
            raise ValueError("a stage output needs a table, rows, data or a file")
        artifact = Artifact(digest, output.kind, path, dict(output.meta))
        file_sha = sha256_file(path)
        # A stage's finished work is recorded whatever another process's hold on the catalog costs.
        with self.catalog.transaction(wait=math.inf) as con:
            insert_rows(con, "artifacts", [{
                "digest": digest, "kind": output.kind, "path": self.store.relative(path), "file_sha256": file_sha,
                "bytes": path.stat().st_size, "created_at": utcnow(),
                "meta": json.dumps(dict(output.meta), default=str)}], "OR REPLACE")
            con.execute("""UPDATE runs SET status=?, output=?, finished_at=?, seconds=?, error=?, summary=?
                           WHERE run_id=?""",
                        [status, digest, utcnow(), seconds, error,
                         json.dumps(dict(output.summary), default=str), run_id])
            if output.publish is not None:
                output.publish(con, artifact)
        return artifact


def describe_difference(code_version: str, params: Mapping[str, Any], digests: Mapping[str, str],
                        previous: Mapping[str, Any]) -> str:
    """Why a request differs from the last completed run of the same target, in words."""
    reasons = []
    if previous["code_version"] != code_version:
        reasons.append(f"code version {previous['code_version']} -> {code_version}")
    old_params = json.loads(previous["params"] or "{}")
    new_params = json.loads(plain_json(dict(params)))
    changed = sorted(k for k in set(old_params) | set(new_params) if old_params.get(k) != new_params.get(k))
    if changed:
        reasons.append("params: " + ", ".join(
            f"{k} {_short(old_params.get(k))} -> {_short(new_params.get(k))}" for k in changed))
    old_inputs = json.loads(previous["inputs"] or "{}")
    for name in sorted(set(old_inputs) | set(digests)):
        if old_inputs.get(name) != digests.get(name):
            reasons.append(f"input content: {name} changed")
    return "; ".join(reasons) or "changed"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
