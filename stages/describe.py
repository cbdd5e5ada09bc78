"""describe: N spatial or temporal descriptions per class, from an LLM or an imported file.

One request per (class, kind), cached by a key over endpoint, model, rendered messages,
sampling and output schema; an invalid answer is answered back with what is wrong (a new
request, itself cached), so a rerun replays the whole exchange without sending anything.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from cache.catalog import insert_rows, utcnow
from cache.errors import UserError
from stages.engine.stage import (
    Artifact,
    Context,
    FileDigest,
    Output,
    Request,
    Resolved,
    Stage,
    StageFailed,
    artifact_of,
    path_of,
)
from stages.formats.textfiles import is_int, parse_json, read_text
from prompts import load_sentence_frames
from prompts.answers import Description, parse_answer, validate_phrases, validate_sentences
from prompts.llm import (
    LLMClient,
    LLMError,
    LLMSampling,
    Recorder,
    SchemaRejected,
    endpoint_host,
    recover_journals,
    request_key,
    resolve_api_key,
    response_format,
)
from prompts.tokens import ClipTokenCounter, clip_token_counter
from stages.artifacts import read_classes

SCHEMA = pa.schema([("dataset", pa.string()), ("class_id", pa.int32()), ("class_name", pa.string()),
                    ("kind", pa.string()), ("idx", pa.int32()), ("phrase", pa.string()), ("text", pa.string()),
                    ("n_tokens", pa.int32()), ("request_key", pa.string()), ("problems", pa.list_(pa.string()))])


@dataclass
class ItemResult:
    class_id: int
    class_name: str
    descriptions: list[Description] = field(default_factory=list)
    request_key: str = ""
    failure: str = ""
    sent: int = 0
    cached: int = 0


class DescribeStage(Stage):
    code_version = "1"

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
        return f"describe:{req.params['dataset']}:{req.params['kind']}"

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output:
        p = req.params
        rows = read_classes(artifact_of(inputs["classes"]))
        refuse_shared_names(rows)
        classes = [(cid, name) for cid, _raw, name in rows]
        try:
            sentence_frame = load_sentence_frames(path_of(inputs["template:frames"]))[p["kind"]]
        except ValueError as exc:
            raise UserError(str(exc), 2) from None
        counter = clip_token_counter()
        if p["source"] == "file":
            results, notes = self._import(req, path_of(inputs["file"]), classes, sentence_frame, counter, ctx)
        else:
            results, notes = self._ask(req, inputs, classes, sentence_frame, counter, ctx)
        return self._finish(req, results, notes, ctx)

    # -- LLM -----------------------------------------------------------------------------
    def _ask(self, req: Request, inputs: Mapping[str, Resolved], classes: list[tuple[int, str]], sentence_frame: str,
             counter: ClipTokenCounter, ctx: Context) -> tuple[list[ItemResult], dict[str, Any]]:
        from tqdm import tqdm

        p = req.params
        api_key = resolve_api_key(req.locators.get("base_url_given", False))
        journal = ctx.home / "journal"
        recovered, damaged = recover_journals(ctx.catalog, journal)
        if recovered or damaged:
            ctx.echo(f"       recovered {recovered} recorded LLM attempts of an interrupted run"
                     + (f"; skipped {damaged} damaged journal lines" if damaged else ""))
        with ctx.catalog.transaction() as con:
            # The finish reason is part of the answer: a cut-off answer is re-asked with words saying so,
            # and a resumed run must build that same re-ask (same key) to find its cached answer.
            cache = {key: (response, finish) for key, response, finish in con.execute(
                "SELECT request_key, response, finish_reason FROM llm_requests WHERE status = 'ok' "
                "QUALIFY row_number() OVER (PARTITION BY request_key ORDER BY created_at, attempt_id) = 1"
            ).fetchall()}
            row = con.execute("SELECT json_schema FROM llm_endpoints WHERE endpoint_host = ? AND model = ?",
                              [endpoint_host(p["endpoint"]), p["model"]]).fetchone()
        if ctx.forced:  # describe --force: what was learned about the endpoint may be out of date
            row = None
        mode = None if row is None else ("json_schema" if row[0] else "json_object")
        sampling = LLMSampling(p["temperature"], p["max_tokens"], p["seed"])
        recorder = Recorder(ctx.catalog, journal)
        client = LLMClient(p["endpoint"], p["model"], api_key, sampling, recorder,
                           timeout=req.locators.get("timeout", 60.0))
        conv = _Conversation(req, inputs, sentence_frame, counter, client, cache)
        results: list[ItemResult] = []
        try:
            todo = list(classes)
            if mode is None and todo:
                # Learn once whether the endpoint takes json_schema (llama.cpp answers HTTP 500).
                cid, name = todo.pop(0)
                try:
                    first = conv.describe(cid, name, "json_schema", probing=True)
                    mode = "json_schema"
                    # Learned only from an answer: a 404, a dead server or failing 500s teach nothing.
                    learned = first.sent + first.cached > 0
                except SchemaRejected:
                    mode, learned = "json_object", True
                    ctx.echo("       the endpoint refuses response_format json_schema: asking for plain JSON")
                    first = conv.describe(cid, name, mode)
                results.append(first)
                if learned:
                    with ctx.catalog.transaction() as con:
                        insert_rows(con, "llm_endpoints", [{
                            "endpoint_host": endpoint_host(p["endpoint"]), "model": p["model"],
                            "json_schema": mode == "json_schema", "checked_at": utcnow()}], "OR REPLACE")
            with ThreadPoolExecutor(max_workers=max(1, int(req.locators.get("concurrency", 8)))) as pool, \
                    tqdm(total=len(classes), initial=len(results), desc=f"describe {p['kind']}",
                         unit="class", disable=not ctx.option("progress", True)) as bar:
                futures = [pool.submit(conv.describe, cid, name, mode) for cid, name in todo]
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update(1)
        finally:
            recorder.close()
        notes = {"requests_sent": client.sent, "answers_cached": sum(r.cached for r in results),
                 "tokens_in": client.prompt_tokens, "tokens_out": client.completion_tokens,
                 "response_format": mode, "model": p["model"], "endpoint": p["endpoint"]}
        return results, notes

    # -- import ----------------------------------------------------------------------------
    def _import(self, req: Request, path: Path, classes: list[tuple[int, str]], sentence_frame: str,
                counter: ClipTokenCounter, ctx: Context) -> tuple[list[ItemResult], dict[str, Any]]:
        mapping = read_description_file(path, classes)
        counts = Counter(len(v) for v in mapping.values() if isinstance(v, list))
        n = req.params["n"] or (counts.most_common(1)[0][0] if counts else 0)
        results = []
        for cid, name in classes:
            entries = mapping.get(cid)
            if entries is None:
                results.append(ItemResult(cid, name, failure=f"no entry for this class in {path.name}"))
                continue
            verdict = validate_sentences(entries if isinstance(entries, list) else [entries], n, name, sentence_frame,
                                         counter, req.params["context_length"])
            results.append(ItemResult(cid, name, verdict.descriptions, failure="; ".join(verdict.fatal)))
        first_use: dict[str, int] = {}
        for r in sorted(results, key=lambda r: r.class_id):
            for d in r.descriptions:
                other = first_use.setdefault(d.text.casefold(), r.class_id)
                if other != r.class_id:
                    d.problems.append(f"same text as class {other}")
        return results, {"source": str(path), "n": n}

    # -- output ----------------------------------------------------------------------------
    def _finish(self, req: Request, results: list[ItemResult], notes: dict[str, Any], ctx: Context) -> Output:
        p = req.params
        results.sort(key=lambda r: r.class_id)
        rows = [(p["dataset"], r.class_id, r.class_name, p["kind"], i, d.phrase, d.text, d.n_tokens,
                 r.request_key or None, d.problems)
                for r in results if not r.failure for i, d in enumerate(r.descriptions)]
        table = pa.Table.from_pylist([dict(zip(SCHEMA.names, row)) for row in rows], schema=SCHEMA)
        failures = [r for r in results if r.failure]

        def publish(con, artifact: Artifact) -> None:
            con.execute("DELETE FROM descriptions WHERE dataset = ? AND kind = ?", [p["dataset"], p["kind"]])
            insert_rows(con, "descriptions", table.to_pylist())
            con.execute("DELETE FROM description_failures WHERE dataset = ? AND kind = ?", [p["dataset"], p["kind"]])
            insert_rows(con, "description_failures",
                        [{"dataset": p["dataset"], "kind": p["kind"], "class_id": r.class_id, "class_name": r.class_name,
                          "reason": r.failure, "run_id": ctx.run_id} for r in failures])

        flagged = [(r, d) for r in results if not r.failure for d in r.descriptions if d.problems]
        summary = {**notes, "classes": len(results), "rows": len(rows), "failed_classes": len(failures),
                   "rows_with_problems": len(flagged)}
        _report(ctx, p, summary, flagged, failures)
        output = Output(kind="descriptions", table=table, publish=publish, summary=summary,
                        meta={"dataset": p["dataset"], "kind": p["kind"]})
        if failures:
            raise StageFailed(f"{len(failures)} of {len(results)} classes have no valid {p['kind']} descriptions "
                              "(listed above; also in the description_failures table); the others are stored",
                              output)
        return output

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        p = req.params
        if p["source"] == "file":
            return f"import {p['kind']} descriptions from {req.inputs['file'].path}"  # type: ignore[union-attr]
        if inputs is None:  # the class list is not registered yet: read its file for the count
            from stages.formats.classlists import read_class_list

            source = req.inputs["classes"].inputs["file"]  # type: ignore[union-attr]
            rows = [(c.class_id, c.raw_name, c.name) for c in read_class_list(source.path)]  # type: ignore[union-attr]
        else:
            rows = read_classes(artifact_of(inputs["classes"]))
        refuse_shared_names(rows)
        classes = [(cid, name) for cid, _raw, name in rows]
        cached: set[str] = set()
        if ctx.catalog.exists():
            with ctx.catalog.reader() as con:
                cached = {k for (k,) in con.execute(
                    "SELECT DISTINCT request_key FROM llm_requests WHERE status = 'ok'").fetchall()}
        templates = {k: FileDigest(v.path, "") for k, v in req.inputs.items() if k.startswith("template:")}
        conv = _Conversation(req, templates, "", clip_token_counter(), None, {})
        keys = [conv.first_key(name, "json_schema") for _, name in classes]
        keys_plain = [conv.first_key(name, "json_object") for _, name in classes]
        hits = sum(a in cached or b in cached for a, b in zip(keys, keys_plain))
        return (f"{len(classes) - hits} requests would be sent to {p['endpoint']} (model {p['model']}); "
                f"{hits} answers are cached; invalid answers would add re-asks")


class _Conversation:
    """The exchange for one (class, kind): ask, validate, tell the model what was wrong, repeat."""

    def __init__(self, req: Request, inputs: Mapping[str, Resolved], sentence_frame: str, counter: ClipTokenCounter,
                 client: LLMClient | None, cache: dict[str, tuple[str, str | None]]) -> None:
        from jinja2 import Environment, StrictUndefined

        env = Environment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
        kind = req.params["kind"]
        self.p = req.params
        variables = {"n": 2, "kind": kind, "class_name": "x", "problems": "x"}  # what the renders below pass
        self.system, self.user, self.reask = (_template(env, path_of(inputs[name]), variables)
                                              for name in ("template:system", f"template:{kind}", "template:reask"))
        self.sentence_frame, self.counter, self.client, self.cache = sentence_frame, counter, client, cache
        self.sampling = LLMSampling(self.p["temperature"], self.p["max_tokens"], self.p["seed"])

    def _first_messages(self, name: str) -> list[dict[str, str]]:
        n, kind = self.p["n"], self.p["kind"]
        return [{"role": "system", "content": self.system.render(n=n, kind=kind).strip()},
                {"role": "user", "content": self.user.render(class_name=name, n=n, kind=kind).strip()}]

    def first_key(self, name: str, mode: str) -> str:
        return request_key(self.p["endpoint"], self.p["model"], self._first_messages(name), self.sampling,
                           response_format(mode, self.p["n"]))

    def describe(self, class_id: int, name: str, mode: str, probing: bool = False) -> ItemResult:
        assert self.client is not None
        n = self.p["n"]
        fmt = response_format(mode, n)
        messages = self._first_messages(name)
        result = ItemResult(class_id, name)
        budget = 1 + self.p["max_reasks"]  # new answers this run; cached ones are free
        problems: list[str] = []
        while True:
            key = request_key(self.p["endpoint"], self.p["model"], messages, self.sampling, fmt)
            hit = self.cache.get(key)
            if hit is None:
                if budget == 0:
                    result.failure = "; ".join(problems) or "no valid answer"
                    return result
                budget -= 1
                try:
                    answer = self.client.complete(messages, fmt, key, {"dataset": self.p["dataset"],
                                                  "class_name": name, "kind": self.p["kind"]},
                                                  probing_schema=probing and result.sent == 0)
                except SchemaRejected:
                    raise
                except LLMError as exc:
                    result.failure = str(exc)
                    return result
                content, finish = answer.content, answer.finish_reason
                self.cache[key] = (content, finish)
                result.sent += 1
            else:
                content, finish = hit
                result.cached += 1
            items, problems = parse_answer(content, n)
            if finish == "length":
                problems.append("the answer was cut off at max_tokens")
            if items is not None:
                verdict = validate_phrases(items, n, name, self.sentence_frame, self.counter, self.p["context_length"])
                problems += verdict.fatal
                if not problems:
                    result.descriptions, result.request_key = verdict.descriptions, key
                    return result
            messages = messages + [{"role": "assistant", "content": content},
                                   {"role": "user", "content": self.reask.render(
                                       problems="; ".join(problems), n=n).strip()}]


def _template(env: Any, path: Path, variables: Mapping[str, Any]) -> Any:
    """A compiled prompt template that renders with the stage's variables, or UserError naming the
    file: a broken --prompt-dir fails before any request, in one line."""
    try:
        template = env.from_string(path.read_text(encoding="utf-8"))
        template.render(**variables)
    except Exception as exc:  # jinja2's syntax and undefined errors, and whatever the template raises
        line = getattr(exc, "lineno", None)
        raise UserError(f"prompt template {path}{f' line {line}' if line else ''}: {type(exc).__name__}: {exc}",
                        2) from None
    return template


def refuse_shared_names(classes: Sequence[tuple[int, str, str]]) -> None:
    """Classes whose display names differ only in case or spacing (`brush_hair`, `brush hair`,
    `BrushHair`) would share every request (keyed by the name) and every CLIP text: refuse them."""
    by_name: dict[str, list[tuple[int, str]]] = {}
    for cid, raw, name in classes:
        by_name.setdefault(" ".join(name.casefold().split()), []).append((cid, raw))
    clashes = [(name, ids) for name, ids in by_name.items() if len(ids) > 1]
    if clashes:
        said = "; ".join(f"class ids {', '.join(f'{cid} ({raw!r})' for cid, raw in ids)} all read {name!r}"
                         for name, ids in clashes[:5])
        raise UserError(f"classes whose names differ only in case, spaces or underscores would get the same "
                        f"descriptions: {said}; rename them in the class list", 2)


def read_description_file(path: Path, classes: list[tuple[int, str]]) -> dict[int, Any]:
    """The MSTA authors' {"<class id>": [...]} or the CuPL/DCLIP {"<class name>": [...]} format."""
    data = parse_json(path, read_text(path, "description file (--from-file)"))
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a JSON object {{\"<class id or name>\": [sentences]}}", 2)
    if not any(_has_text(v) for v in data.values()):
        raise UserError(f"{path}: no class has a description (every entry is empty); nothing to import", 2)
    if all(is_int(str(k).strip()) for k in data):
        return {int(k): v for k, v in data.items()}
    norm = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())
    by_name = {norm(name): cid for cid, name in classes}
    mapping: dict[int, Any] = {}
    unknown = []
    for k, v in data.items():
        cid = by_name.get(norm(k))
        if cid is None:
            unknown.append(k)
        else:
            mapping[cid] = v
    if unknown and not mapping:
        raise UserError(f"{path}: none of its class names match the class list (e.g. {unknown[0]!r})", 2)
    return mapping


def _has_text(entry: Any) -> bool:
    if isinstance(entry, str):
        return bool(entry.strip())
    return isinstance(entry, list) and any(_has_text(x) for x in entry)


def _report(ctx: Context, p: Mapping[str, Any], summary: Mapping[str, Any],
            flagged: list[tuple[ItemResult, Description]], failures: list[ItemResult]) -> None:
    if "requests_sent" in summary:
        ctx.echo(f"       {summary['classes']} classes: {summary['requests_sent']} requests sent, "
                 f"{summary['answers_cached']} answers cached, {len(failures)} classes failed; "
                 f"tokens in {summary['tokens_in']:,}, out {summary['tokens_out']:,}")
    else:
        ctx.echo(f"       imported {summary['rows']} {p['kind']} descriptions of {summary['classes']} classes "
                 f"from {summary['source']} (N={summary['n']}), {len(failures)} classes failed")
    if flagged:
        kinds = Counter(prob.split(":")[0].split(" '")[0] for _, d in flagged for prob in d.problems)
        ctx.echo(f"       {len(flagged)} descriptions carry problems: "
                 + "; ".join(f"{k} ({v})" for k, v in kinds.most_common(6)))
        by_class: dict[int, tuple[ItemResult, Counter[str]]] = {}
        for r, d in flagged:
            by_class.setdefault(r.class_id, (r, Counter()))[1].update(d.problems)
        for r, probs in list(by_class.values())[:5]:
            ctx.echo(f"         class {r.class_id} {r.class_name!r}: "
                     + "; ".join(f"{p} (x{c})" if c > 1 else p for p, c in probs.items()))
        if len(by_class) > 5:
            ctx.echo(f"         ... all of them: msta-pipe sql \"select class_id, class_name, idx, problems "
                     f"from descriptions where dataset='{p['dataset']}' and kind='{p['kind']}' and len(problems) > 0\"")
    if failures:
        ctx.echo(f"       FAILED classes ({len(failures)}), left out of descriptions:")
        for r in failures[:20]:
            ctx.echo(f"         {r.class_id:>4}  {r.class_name[:40]:<40}  {r.failure[:160]}")
        if len(failures) > 20:
            ctx.echo(f"         ... {len(failures) - 20} more in the description_failures table")
