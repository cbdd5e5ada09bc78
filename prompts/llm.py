"""An OpenAI-compatible chat endpoint, with bounded retries and a record of every attempt.

Every attempt (answer or error) is appended to a journal file and fsynced the moment it
arrives, then copied into the catalog's `llm_requests` in small batches. A process killed
between the two loses nothing: the next run ingests the journal first, so a paid answer is
never asked for twice. The API key is never written anywhere: it is scrubbed from errors, masked
in answers that quote it, and refused in --base-url.
Whatever the endpoint sends (an event stream, an HTML page, an error object with HTTP 200, odd
types, a negative Retry-After), one attempt ends as an answer or as one line saying what came,
within the timeout as a wall clock (a server dripping a byte a second is cut there, not read for
ever) and with at most MAX_ANSWER_BYTES (4 MB) of decoded body in memory: a gzip bomb is not
inflated past it but ends as "answer larger than 4 MB".
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from cache.catalog import Catalog, insert_rows, utcnow
from cache.errors import UserError, one_line, register_secret, scrub
from cache.keys import digest_value

DEFAULT_ENDPOINT = "https://api.openai.com/v1"
NO_KEY = "not-needed"  # sent to local servers named by --base-url when OPENAI_API_KEY is unset
# A real answer is a few kB; 4 MB of decoded body is plenty, and bounds what a gzip bomb costs.
MAX_ANSWER_BYTES = 4 * 2**20
_COLUMNS = ("attempt_id", "request_key", "created_at", "dataset", "class_name", "kind", "model",
            "endpoint_host", "messages", "params", "response_format", "response", "finish_reason",
            "prompt_tokens", "completion_tokens", "latency_s", "status", "error")


_CREDENTIAL_NAME = re.compile(r"(?i)key|token|secret|pass|sig|auth|cred|code")


def _key_like(text: str) -> bool:
    """A key pasted into a URL: a key prefix (sk-, pk_, rk-), a known secret (the API key), or a
    run of 20+ letters and digits mixed, as random tokens are (deployment names, versions and
    UUIDs break theirs with - or _)."""
    if re.match(r"(?i)(?:sk|pk|rk)[-_]", text) or scrub(text) != text:
        return True
    return any(len(run) >= 20 and not run.isalpha() and not run.isdigit()
               for run in re.findall(r"[A-Za-z0-9]+", text))


def normalise_endpoint(base_url: str | None) -> str:
    """Scheme, host, port, path and the sorted query (Azure-style endpoints need `?api-version=`;
    it is sent with every request). Credentials are refused, never silently dropped or stored:
    the key belongs in OPENAI_API_KEY."""
    parts = urlsplit(base_url or DEFAULT_ENDPOINT)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ValueError("--base-url must be an http(s) URL like http://127.0.0.1:8000/v1, "
                         f"got {one_line(base_url or '')!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("--base-url must not carry credentials (user:password@host): they would not be sent; "
                         "put the API key in OPENAI_API_KEY")
    query = parse_qsl(parts.query, keep_blank_values=True)
    secret = sorted({name for name, _ in query if _CREDENTIAL_NAME.search(name)})
    if secret:
        raise ValueError(f"--base-url must not carry credentials in its query ({', '.join(secret)}): it is stored "
                         "with every run; put the API key in OPENAI_API_KEY")
    # Named by position only: the message must not print the secret it refuses.
    segments = parts.path.strip("/").split("/")
    where = [f"path segment {i}" for i, seg in enumerate(segments, 1) if _key_like(unquote(seg))]
    where += [f"query parameter {i}" for i, pair in enumerate(query, 1) if any(map(_key_like, pair))]
    if where:
        raise ValueError(f"--base-url must not carry credentials in its path or query ({', '.join(where)} looks "
                         "like a key): it is stored with every run; put the API key in OPENAI_API_KEY")
    tail = f"?{urlencode(sorted(query))}" if query else ""
    return f"{parts.scheme}://{parts.hostname}{f':{port}' if port else ''}{parts.path.rstrip('/')}{tail}"


def endpoint_host(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def response_format(mode: str, n: int) -> dict[str, Any]:
    if mode == "json_object":
        return {"type": "json_object"}
    schema = {"type": "object", "additionalProperties": False, "required": ["descriptions"],
              "properties": {"descriptions": {"type": "array", "items": {"type": "string"},
                                              "minItems": n, "maxItems": n}}}
    return {"type": "json_schema", "json_schema": {"name": "descriptions", "strict": True, "schema": schema}}


@dataclass(frozen=True)
class LLMSampling:
    temperature: float
    max_tokens: int
    seed: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}


def request_key(endpoint: str, model: str, messages: Sequence[Mapping[str, str]], sampling: LLMSampling,
                fmt: Mapping[str, Any]) -> str:
    return digest_value({"endpoint": endpoint, "model": model, "messages": list(messages),
                         "sampling": sampling.to_dict(), "response_format": dict(fmt)})


@dataclass
class Completion:
    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class LLMError(Exception):
    """The endpoint refused or kept failing; message is safe to show (no secrets)."""


class SchemaRejected(LLMError):
    """The endpoint does not take response_format json_schema (llama.cpp answers HTTP 500)."""


class AnswerTimeout(Exception):
    """An attempt still without its whole answer at its deadline: a timeout like the client's own."""


def refuses_schema(status: int, detail: str) -> bool:
    """A clear refusal of response_format, as opposed to a wrong URL (404) or a passing failure (500):
    only this may be remembered for the endpoint and model."""
    return status in (400, 415, 422, 500) and re.search(r"(?i)response_format|json_schema", detail) is not None


class Recorder:
    """Journal-then-catalog writer of `llm_requests` rows, safe to call from worker threads."""

    def __init__(self, catalog: Catalog, journal_dir: Path, flush_every: float = 0.5) -> None:
        self.catalog = catalog
        journal_dir.mkdir(parents=True, exist_ok=True)
        self.path = journal_dir / f"llm-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(flush_every,), daemon=True)
        self._thread.start()

    def record(self, row: dict[str, Any]) -> None:
        if row.get("error"):
            row = {**row, "error": one_line(row["error"])}  # the one funnel into llm_requests.error
        line = json.dumps(row, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            self._pending.append(row)
        os.fsync(self._file.fileno())  # outside the lock: concurrent fsyncs of one file coalesce

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            rows, self._pending = self._pending, []
        if rows:
            record_rows(self.catalog, rows)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()
        self._file.close()
        self.path.unlink(missing_ok=True)


def record_rows(catalog: Catalog, rows: Sequence[Mapping[str, Any]]) -> None:
    with catalog.transaction() as con:  # an attempt seen before (same attempt_id) is skipped
        insert_rows(con, "llm_requests", [{c: row.get(c) for c in _COLUMNS} for row in rows], "OR IGNORE")


_JOURNAL_TYPES: dict[str, type | tuple[type, ...]] = {
    **{c: str for c in _COLUMNS}, "prompt_tokens": int, "completion_tokens": int, "latency_s": (int, float)}


def _journal_row(line: bytes) -> dict[str, Any] | None:
    """A journal line as a row, or None when it is damaged (cut by a kill, or edited): one bad
    line must neither block the recovery of the others nor break the insert of its batch."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past Python's limit
        return None
    if not isinstance(row, dict) or not row.get("attempt_id") or not row.get("request_key"):
        return None
    if any(row.get(c) is not None and not isinstance(row[c], t) for c, t in _JOURNAL_TYPES.items()):
        return None
    return row


def recover_journals(catalog: Catalog, journal_dir: Path) -> tuple[int, int]:
    """Copy the journals of killed runs into the catalog (idempotent), then remove them.
    Returns (attempts recovered, damaged lines skipped)."""
    count = damaged = 0
    for path in sorted(journal_dir.glob("llm-*.jsonl")):
        rows = []
        for line in path.read_bytes().splitlines():
            row = _journal_row(line) if line.strip() else None
            if row is None:
                damaged += bool(line.strip())
            else:
                rows.append(row)
        if rows:
            record_rows(catalog, rows)
            count += len(rows)
        path.unlink()
    return count, damaged


class LLMClient:
    """Sync `openai` client (thread-safe) with our own retry loop, so each attempt is recorded."""

    def __init__(self, endpoint: str, model: str, api_key: str, sampling: LLMSampling,
                 recorder: Recorder, timeout: float = 60.0, http_retries: int = 5) -> None:
        self.endpoint, self.model, self.sampling = endpoint, model, sampling
        self.recorder = recorder
        self.http_retries = http_retries
        self.timeout = timeout
        register_secret(api_key)
        # Masked in answers as scrub() masks it in errors (a short key is no secret worth mangling words for).
        self._key = api_key if len(api_key) >= 6 and api_key != NO_KEY else ""
        self._client = _openai_client(endpoint, api_key, timeout)
        self.sent = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._count_lock = threading.Lock()

    def complete(self, messages: Sequence[Mapping[str, str]], fmt: Mapping[str, Any], key: str,
                 context: Mapping[str, Any], probing_schema: bool = False) -> Completion:
        """One answer, retrying 429 (honouring Retry-After), 5xx, timeouts and dropped connections.
        An answer quoting the API key comes back (and is recorded) with the key masked."""
        import openai

        last_error = ""
        for attempt in range(self.http_retries + 1):
            started = time.perf_counter()
            row = {"attempt_id": uuid.uuid4().hex, "request_key": key, "created_at": utcnow().isoformat(sep=" "),
                   "model": self.model, "endpoint_host": endpoint_host(self.endpoint),
                   "messages": json.dumps(list(messages)), "params": json.dumps(self.sampling.to_dict()),
                   "response_format": fmt["type"], **context}
            with self._count_lock:
                self.sent += 1
            try:
                kwargs: dict[str, Any] = {"model": self.model, "messages": list(messages),
                                          "temperature": self.sampling.temperature,
                                          "max_tokens": self.sampling.max_tokens, "response_format": dict(fmt)}
                if self.sampling.seed is not None:
                    kwargs["seed"] = self.sampling.seed
                resp = self._create(kwargs, time.monotonic() + self.timeout)
            except openai.APIStatusError as exc:
                status = exc.status_code
                detail = _error_text(exc)
                last_error = one_line(f"HTTP {status}: {detail}")
                self.recorder.record({**row, "status": "error", "error": last_error,
                                      "latency_s": time.perf_counter() - started})
                if probing_schema and refuses_schema(status, detail):
                    raise SchemaRejected(last_error) from None
                if status == 401 or status == 403:
                    raise LLMError(f"{last_error} (check OPENAI_API_KEY for {self.endpoint})") from None
                if status != 429 and status < 500 and status != 408:
                    raise LLMError(last_error) from None
                _sleep_before_retry(attempt, exc.response.headers.get("retry-after"))
                continue
            except (openai.APIConnectionError, openai.APITimeoutError, AnswerTimeout) as exc:
                last_error = one_line(f"{type(exc).__name__}: {exc}")
                self.recorder.record({**row, "status": "error", "error": last_error,
                                      "latency_s": time.perf_counter() - started})
                _sleep_before_retry(attempt, None)
                continue
            except LLMError as exc:  # a body over MAX_ANSWER_BYTES or not decodable: not retried, it comes again
                self._give_up(row, started, str(exc))
            except (openai.APIError, ValueError, RecursionError) as exc:  # a reply the client could not even read
                self._give_up(row, started, f"the endpoint's answer could not be read: {type(exc).__name__}: {exc}")
            try:
                done = _completion(resp)
            except LLMError as exc:  # not retried: an endpoint that answers this way does so again
                self._give_up(row, started, str(exc))
            if self._key:
                done.content = done.content.replace(self._key, "***")
                done.finish_reason = done.finish_reason and done.finish_reason.replace(self._key, "***")
            with self._count_lock:
                self.prompt_tokens += done.prompt_tokens
                self.completion_tokens += done.completion_tokens
            self.recorder.record({**row, "status": "ok", "response": done.content,
                                  "finish_reason": done.finish_reason, "prompt_tokens": done.prompt_tokens,
                                  "completion_tokens": done.completion_tokens,
                                  "latency_s": time.perf_counter() - started})
            return done
        raise LLMError(f"no answer after {self.http_retries + 1} attempts; last: {last_error}")

    def _create(self, kwargs: dict[str, Any], deadline: float) -> Any:
        """The client's call, given up at `deadline`: its own timeout is per read, which a server
        sending a byte a second resets for ever. Python cannot stop a thread, so the call is left
        to end by itself (at its next body read, past the deadline; in the headers, when the server
        falls silent for the timeout or closes); it records nothing."""
        done: Future[Any] = Future()

        def call() -> None:
            _attempt.deadline = deadline
            try:
                done.set_result(self._client.chat.completions.create(**kwargs))
            except BaseException as exc:  # raised in the waiting thread
                done.set_exception(exc)

        threading.Thread(target=call, name="llm-attempt", daemon=True).start()
        try:
            return done.result(timeout=max(0.0, deadline - time.monotonic()))
        except (FutureTimeout, AnswerTimeout):  # the latter: the call saw the deadline pass first
            raise AnswerTimeout(f"no whole answer within {self.timeout:g} s") from None

    def _give_up(self, row: dict[str, Any], started: float, error: str) -> NoReturn:
        error = one_line(error)
        self.recorder.record({**row, "status": "error", "error": error, "latency_s": time.perf_counter() - started})
        raise LLMError(error)


_attempt = threading.local()  # .deadline: when the attempt running in this thread is given up


@functools.cache
def _openai_client(endpoint: str, api_key: str, timeout: float) -> Any:
    """One thread-safe client per endpoint in a process: describe's spatial and temporal stages
    share its kept-alive connections, and build its TLS context (~30 ms) once. Its bodies are
    decoded by _bounded_body, never by the HTTP library, which would inflate a gzip body whole."""
    from openai import DefaultHttpxClient, OpenAI

    http = sys.modules[DefaultHttpxClient.__mro__[1].__module__]  # httpx2 since openai 3, httpx before

    class Body(http.SyncByteStream):
        def __init__(self, raw: Any, coding: str) -> None:
            self.raw, self.coding, self.deadline = raw, coding, getattr(_attempt, "deadline", math.inf)

        def __iter__(self) -> Iterator[bytes]:
            return _bounded_body(self.raw, self.coding, self.deadline)

        def close(self) -> None:
            self.raw.close()

    def bound(response: Any) -> None:  # runs once the headers are in, before the body is read
        response.stream = Body(response.stream, response.headers.pop("content-encoding", "identity"))

    client = DefaultHttpxClient(headers={"Accept-Encoding": "gzip, deflate"}, event_hooks={"response": [bound]})
    base, _, query = endpoint.partition("?")
    return OpenAI(base_url=base, api_key=api_key, max_retries=0, timeout=timeout, http_client=client,
                  default_query=dict(parse_qsl(query, keep_blank_values=True)) or None)


def _bounded_body(raw: Iterable[bytes], coding: str, deadline: float) -> Iterator[bytes]:
    """The decoded body, never more than MAX_ANSWER_BYTES of it inflated, nor read past `deadline`."""
    coding = coding.strip().lower() or "identity"
    if coding not in ("identity", "gzip", "x-gzip", "deflate"):
        raise LLMError(f"the endpoint's answer is in Content-Encoding {coding!r}, which is not read")
    inflate = None if coding == "identity" else zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
    size = 0
    for chunk in raw:
        if time.monotonic() > deadline:  # the waiting thread gave up: stop reading a drip
            raise AnswerTimeout("the answer was still arriving at the deadline")
        if inflate is not None:
            try:  # max_length: not one byte more than could still fit under the cap
                chunk = inflate.decompress(chunk, MAX_ANSWER_BYTES + 1 - size)
            except zlib.error as exc:
                raise LLMError(f"the endpoint's {coding} answer cannot be decoded: {exc}") from None
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise LLMError(f"answer larger than {MAX_ANSWER_BYTES // 2**20} MB (decoded); not read further")
        yield chunk


def _completion(resp: Any) -> Completion:
    """The answer in an HTTP 200 reply, or LLMError saying what came instead. The client hands back
    the raw text of a body that is not JSON and does not validate a JSON one, so check it all."""
    if isinstance(resp, str):
        text = resp.lstrip()
        what = ("an event stream (text/event-stream)" if text.startswith(("data:", "event:"))
                else "an HTML page" if text[:20].lower().startswith(("<!doctype", "<html"))
                else "a body that is not JSON")
        raise LLMError(f"the endpoint answered HTTP 200 with {what}, not a chat completion "
                       f"(it starts {text[:60]!r}); check --base-url")
    error = getattr(resp, "error", None)
    if error:
        raise LLMError(f"the endpoint answered HTTP 200 with an error: "
                       f"{(error.get('message') or error) if isinstance(error, dict) else error}")
    choices = getattr(resp, "choices", None)
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = getattr(choice, "message", None)
    if message is None:
        raise LLMError("the endpoint's answer holds no message (choices is empty or [{}])")
    content = getattr(message, "content", None)
    if content is None:
        if getattr(message, "refusal", None):
            raise LLMError(f"the model refused: {message.refusal}")
        if getattr(message, "tool_calls", None):
            raise LLMError("the model answered with tool calls only, no content")
        content = ""
    elif not isinstance(content, str):  # a parsed JSON object or a number: validated like any answer
        content = json.dumps(content)
    usage = getattr(resp, "usage", None)
    finish = getattr(choice, "finish_reason", None)
    return Completion(content=content, finish_reason=finish if isinstance(finish, str) else None,
                      prompt_tokens=_count(getattr(usage, "prompt_tokens", None)),
                      completion_tokens=_count(getattr(usage, "completion_tokens", None)))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _error_text(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg)[:300]
    return str(getattr(exc, "message", exc))[:300]


def _sleep_before_retry(attempt: int, retry_after: str | None) -> None:
    try:
        wait = float(retry_after) if retry_after is not None else None
    except ValueError:  # an HTTP date, or garbage
        wait = None
    if wait is None or not math.isfinite(wait) or wait < 0:  # "nan" or "-5" from a broken proxy
        wait = min(0.25 * 2 ** attempt, 8.0) * (0.5 + random.random())  # jitter spreads a herd of 429s
    time.sleep(min(wait, 30.0))


def resolve_api_key(base_url_given: bool) -> str:
    """The key sent to the endpoint: OPENAI_API_KEY, or a placeholder for a server named by --base-url."""
    key = os.environ.get("OPENAI_API_KEY", "")
    if key:
        return key
    if base_url_given:
        return NO_KEY  # local servers (llama.cpp, vLLM, Ollama) accept any key
    raise UserError("no LLM endpoint configured: set OPENAI_API_KEY for OpenAI, or pass --base-url "
                    "(or OPENAI_BASE_URL) for another OpenAI-compatible server, or import descriptions "
                    "with --from-file", 2)
