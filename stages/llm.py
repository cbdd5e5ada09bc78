"""An OpenAI-compatible chat endpoint, with bounded retries and a record of every attempt.

Every attempt (answer or error) is appended to a journal file and fsynced the moment it
arrives, then copied into the catalog's `llm_requests` in small batches. A process killed
between the two loses nothing: the next run ingests the journal first, so a paid answer is
never asked for twice. The API key is never written anywhere and is scrubbed from errors.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cache.catalog import Catalog, insert_rows, utcnow
from pipeline.keys import digest_value

DEFAULT_ENDPOINT = "https://api.openai.com/v1"
_COLUMNS = ("attempt_id", "request_key", "created_at", "dataset", "class_name", "kind", "model",
            "endpoint_host", "messages", "params", "response_format", "response", "finish_reason",
            "prompt_tokens", "completion_tokens", "latency_s", "status", "error")


def normalise_endpoint(base_url: str | None) -> str:
    """Scheme, host, port and path only: credentials or query strings never enter a key."""
    parts = urlsplit(base_url or DEFAULT_ENDPOINT)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--base-url must be an http(s) URL like http://127.0.0.1:8000/v1, got {base_url!r}")
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}"


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
class Sampling:
    temperature: float
    max_tokens: int
    seed: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}


def request_key(endpoint: str, model: str, messages: Sequence[Mapping[str, str]], sampling: Sampling,
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


def recover_journals(catalog: Catalog, journal_dir: Path) -> int:
    """Copy the journals of killed runs into the catalog (idempotent), then remove them."""
    count = 0
    for path in sorted(journal_dir.glob("llm-*.jsonl")):
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by the kill: that attempt is simply not recorded
        if rows:
            record_rows(catalog, rows)
            count += len(rows)
        path.unlink()
    return count


class LLMClient:
    """Sync `openai` client (thread-safe) with our own retry loop, so each attempt is recorded."""

    def __init__(self, endpoint: str, model: str, api_key: str, sampling: Sampling,
                 recorder: Recorder, timeout: float = 60.0, http_retries: int = 5) -> None:
        from openai import OpenAI

        self.endpoint, self.model, self.sampling = endpoint, model, sampling
        self.recorder = recorder
        self.http_retries = http_retries
        self._secret = api_key
        self._client = OpenAI(base_url=endpoint, api_key=api_key, max_retries=0, timeout=timeout)
        self.sent = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._count_lock = threading.Lock()

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret and len(self._secret) > 3 else text

    def complete(self, messages: Sequence[Mapping[str, str]], fmt: Mapping[str, Any], key: str,
                 context: Mapping[str, Any], probing_schema: bool = False) -> Completion:
        """One answer, retrying 429 (honouring Retry-After), 5xx, timeouts and dropped connections."""
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
                resp = self._client.chat.completions.create(**kwargs)
            except openai.APIStatusError as exc:
                status = exc.status_code
                last_error = self._scrub(f"HTTP {status}: {_error_text(exc)}")
                self.recorder.record({**row, "status": "error", "error": last_error,
                                      "latency_s": time.perf_counter() - started})
                if probing_schema and status in (400, 404, 415, 422, 500) and (status != 500 or attempt >= 1):
                    raise SchemaRejected(last_error) from None
                if status == 401 or status == 403:
                    raise LLMError(f"{last_error} (check OPENAI_API_KEY for {self.endpoint})") from None
                if status != 429 and status < 500 and status != 408:
                    raise LLMError(last_error) from None
                _sleep_before_retry(attempt, exc.response.headers.get("retry-after"))
                continue
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                last_error = self._scrub(f"{type(exc).__name__}: {exc}")
                self.recorder.record({**row, "status": "error", "error": last_error,
                                      "latency_s": time.perf_counter() - started})
                _sleep_before_retry(attempt, None)
                continue
            choice = resp.choices[0] if resp.choices else None
            usage = resp.usage
            done = Completion(content=(choice.message.content or "") if choice else "",
                              finish_reason=choice.finish_reason if choice else None,
                              prompt_tokens=usage.prompt_tokens if usage else 0,
                              completion_tokens=usage.completion_tokens if usage else 0)
            with self._count_lock:
                self.prompt_tokens += done.prompt_tokens
                self.completion_tokens += done.completion_tokens
            self.recorder.record({**row, "status": "ok", "response": done.content,
                                  "finish_reason": done.finish_reason, "prompt_tokens": done.prompt_tokens,
                                  "completion_tokens": done.completion_tokens,
                                  "latency_s": time.perf_counter() - started})
            return done
        raise LLMError(f"no answer after {self.http_retries + 1} attempts; last: {last_error}")


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
    except ValueError:
        wait = None
    if wait is None:
        wait = min(0.25 * 2 ** attempt, 8.0) * (0.5 + random.random())  # jitter spreads a herd of 429s
    time.sleep(min(wait, 30.0))

