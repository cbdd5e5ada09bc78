"""An OpenAI-compatible chat-completions server for tests, able to misbehave on purpose.

Tests run the real `openai` client over real sockets against it:

    with LLMServer(latency=0.05, misbehave_fraction=0.2, seed=0) as server:
        client = OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        ...  # run the code under test
        stats = server.stats()  # e.g. by_class[cls][kind]["after_accepted"] == 0

It answers the describe prompt (first user message holds `Class: ...`, `Kind: spatial|temporal`
and `exactly N`) with `{"descriptions": [...]}`, N deterministic phrases (`descriptions_for`).
The first answered request for a (class, kind) misbehaves with probability `misbehave_fraction`,
decided by a hash of (seed, class, kind) (`planned_misbehaviour`), so runs are reproducible; the
next one behaves.  Rejections (401, 400, json_schema with `reject_json_schema`) are not answers.

Standalone (subprocess tests, benchmarks): `python tests/llm_server.py --latency 0.2 ...`
prints its base URL as the first stdout line and serves until `--idle-timeout` seconds pass
without requests, its parent dies, or its stdin pipe is closed.  `GET /_stats` answers the counters
(`stats()`) without being counted; `--stats-file` rewrites them after every request, which costs
milliseconds per request once many classes were asked.  Standard library only.

Beyond the protocol, `leak_key=True` puts the presented API key into every answer's phrases,
`drip=S` sends every chat reply, status line included, one byte per S seconds, and `gzip=True`
compresses every chat reply (Content-Encoding: gzip), as api.openai.com does.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import select
import socket
import socketserver
import stat
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MODEL_ID = "msta-test-model"

MISBEHAVIOURS: tuple[str, ...] = (
    "429",  # HTTP 429 with Retry-After and an OpenAI-style error body
    "500",  # HTTP 500 with an OpenAI-style error body
    "non_json",  # prose instead of JSON
    "wrong_count",  # N-1 or N+1 phrases
    "empty_string",  # one phrase is ""
    "echo_class",  # every phrase is the class name
    "duplicate",  # the last phrase repeats the first
    "bullets",  # '1. "..."' / '- "..."' decorated phrases: valid once the client strips them
    "truncated",  # JSON cut in the middle, finish_reason "length"
    "objects",  # list of {"index", "description"} objects instead of strings
)

# Replies that break the chat-completion protocol itself (opt-in: never drawn by default). A correct
# client copes or fails the class with one clear line, never a traceback.
HOSTILE: tuple[str, ...] = (
    "sse",  # a text/event-stream body although no stream was asked for
    "html",  # HTTP 200 with an HTML page (a proxy's login or error page)
    "content_object",  # message.content is the JSON object itself, not a string
    "content_number",  # message.content is a number
    "usage_null",  # a valid answer whose usage counts are null
    "empty_choice",  # choices: [{}]
    "error_200",  # HTTP 200 whose body is an error object
    "tool_calls",  # the message holds tool_calls only, content null
    "deep_nesting",  # content is the string [[[...]]], nested deeper than Python's recursion limit
    "deep_body",  # content is that array itself, so the body is nested as deep
    "gzip_bomb",  # Content-Encoding: gzip, ~100 kB that inflate to 100 MB of zeros
)
DEEP = 100_000  # nesting depth of "deep_nesting" and "deep_body"


@functools.cache
def gzip_bomb(size: int = 100 * 2**20) -> bytes:
    """`size` zero bytes, gzip-compressed (about 1000:1)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(2**20)
    return b"".join([*(packer.compress(zeros) for _ in range(size // len(zeros))), packer.flush()])


_CLASS_RE = re.compile(r"^\s*Class:\s*(.+?)\s*$", re.MULTILINE)
_KIND_RE = re.compile(r"^\s*Kind:\s*(spatial|temporal)\b", re.MULTILINE | re.IGNORECASE)
_COUNT_RE = re.compile(r"\bexactly\s+(\d+)\b", re.IGNORECASE)
# Words and punctuation marks: closer to BPE token counts than whitespace-split words.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

_SUBJECTS = ("a person", "a young adult", "an athlete", "a man", "a woman", "a teenager")
_SPATIAL_POSES = (
    "with both arms raised",
    "leaning forward",
    "with one hand extended",
    "with knees slightly bent",
    "standing with feet apart",
    "with the head turned aside",
    "gripping an object",
    "crouching low",
)
_SPATIAL_SETTINGS = (
    "in a bright gym",
    "on an outdoor field",
    "in a living room",
    "on a city street",
    "by a plain wall",
    "near a wooden table",
    "under stage lights",
)
_TEMPORAL_MOTIONS = (
    "raising and lowering the arms",
    "shifting weight between feet",
    "moving toward the camera",
    "turning the torso",
    "bending down and straightening",
    "swinging one arm",
    "stepping sideways",
    "pausing before a quick move",
)
_TEMPORAL_TEMPOS = (
    "at a steady rhythm",
    "faster and faster",
    "slowly and smoothly",
    "in quick bursts",
    "over several seconds",
    "with short pauses",
    "in one continuous motion",
)


def activity_words(class_name: str) -> str:
    """'ApplyEyeMakeup' / 'push_ups' -> 'apply eye makeup' / 'push ups'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", class_name).replace("_", " ")
    return " ".join(spaced.split()).lower()


def descriptions_for(class_name: str, kind: str, count: int) -> list[str]:
    """The well-formed answer: `count` distinct phrases, deterministic per (class, kind, index)."""
    if kind == "spatial":
        middles, tails = _SPATIAL_POSES, _SPATIAL_SETTINGS
    else:
        middles, tails = _TEMPORAL_MOTIONS, _TEMPORAL_TEMPOS
    size = len(_SUBJECTS) * len(middles) * len(tails)
    # A per-class offset into the vocabulary product so that classes do not share phrase shapes.
    offset = int.from_bytes(hashlib.sha256(f"{class_name}\0{kind}".encode()).digest()[:4], "big")
    activity = activity_words(class_name)
    phrases = []
    for i in range(count):
        combo = (offset + i) % size
        subject = _SUBJECTS[combo % len(_SUBJECTS)]
        combo //= len(_SUBJECTS)
        phrase = f"{subject} {middles[combo % len(middles)]} {tails[combo // len(middles)]} during {activity}"
        # Distinct combos run out after `size` phrases; a lap number keeps the rest distinct.
        lap = i // size
        phrases.append(f"{phrase}, take {lap + 1}" if lap else phrase)
    return phrases


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def _error(status_type: str, message: str, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": status_type, "param": None, "code": code}}


class _BadRequest(Exception):
    pass


@dataclass(frozen=True)
class _Ask:
    """What one chat request asks for."""

    model: str
    class_name: str
    kind: str
    count: int
    response_format: str | None  # "json_schema", "json_object", "text" or None
    max_tokens: int | None
    prompt_tokens: int


@dataclass
class _Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    raw: tuple[str, bytes] | None = None  # (content type, bytes) sent instead of the JSON body
    delay: float = 0.0
    # Set when the reply is one a correct client accepts; recorded unless the client left meanwhile.
    accepted_key: tuple[str, str] | None = None


@dataclass
class _KeyStats:
    requests: int = 0
    misbehaved: int = 0
    accepted: int = 0  # delivered answers a correct client accepts: well-formed or "bullets"
    after_accepted: int = 0  # requests arriving after an accepted answer: a correct client sends none


def _text(content: Any) -> str:
    """Message content is a string or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _parse_ask(body: Any) -> _Ask:
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' is required")
    if body.get("stream"):
        raise _BadRequest("this test server does not stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _BadRequest("'messages' must be a list of objects")
    user_texts = [_text(m.get("content")) for m in messages if m.get("role") == "user"]
    if not user_texts:
        raise _BadRequest("'messages' holds no user message")
    first_user = user_texts[0]
    class_match, kind_match = _CLASS_RE.search(first_user), _KIND_RE.search(first_user)
    if class_match is None or kind_match is None:
        raise _BadRequest("the first user message lacks a 'Class: ...' or 'Kind: spatial|temporal' line")

    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise _BadRequest("'response_format' must be an object")
    format_type = _dig(response_format, "type")
    if format_type not in (None, "text", "json_object", "json_schema"):
        raise _BadRequest(f"unknown response_format type {format_type!r}")

    # A strict schema fixes N for constrained decoding, so it wins over the prompt's wording.
    count = _dig(response_format, "json_schema", "schema", "properties", "descriptions", "minItems")
    if not isinstance(count, int):
        count_match = _COUNT_RE.search(first_user)
        if count_match is None:
            raise _BadRequest("the first user message lacks 'exactly N' and the schema no minItems")
        count = int(count_match.group(1))
    if count < 1:
        raise _BadRequest("the number of descriptions must be positive")

    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    return _Ask(
        model=model,
        class_name=class_match.group(1),
        kind=kind_match.group(1).lower(),
        count=count,
        response_format=format_type,
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
        prompt_tokens=sum(count_tokens(_text(m.get("content"))) for m in messages),
    )


class LLMServer:
    """Threaded chat-completions server on 127.0.0.1; a context manager that starts and stops it."""

    def __init__(
        self,
        latency: float = 0.0,
        misbehave_fraction: float = 0.0,
        misbehaviours: list[str] | None = None,
        always_misbehave: dict[str, str] | None = None,
        reject_json_schema: bool = False,
        require_api_key: str | None = None,
        seed: int = 0,
        idle_timeout: float = 600.0,
        retry_after: int | str = 0,
        stats_file: str | os.PathLike[str] | None = None,
        echo_key: bool = False,
        fail_first: int = 0,
        leak_key: bool = False,
        drip: float = 0.0,
        gzip: bool = False,
    ) -> None:
        self._misbehaviours = list(MISBEHAVIOURS if misbehaviours is None else misbehaviours)
        self._always = dict(always_misbehave or {})
        unknown = sorted(set(self._misbehaviours + list(self._always.values())) - set(MISBEHAVIOURS + HOSTILE))
        if unknown:
            raise ValueError(f"unknown misbehaviours {unknown}; known: {list(MISBEHAVIOURS + HOSTILE)}")
        if not 0.0 <= misbehave_fraction <= 1.0:
            raise ValueError("misbehave_fraction must lie in [0, 1]")
        if misbehave_fraction > 0 and not self._misbehaviours:
            raise ValueError("misbehave_fraction > 0 needs at least one misbehaviour")
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self._latency = latency
        self._fraction = misbehave_fraction
        # Public: a test may flip it, as an endpoint upgrade (or a fixed URL) would.
        self.reject_json_schema = reject_json_schema
        self._api_key = require_api_key
        self._seed = seed
        self._idle_timeout = idle_timeout
        self._retry_after = retry_after  # any string, e.g. "-5" or "nan" as broken proxies send
        self._echo_key = echo_key  # error bodies quote the presented key, as some endpoints do
        self._fail_first = fail_first  # the first N chat requests get a generic HTTP 500
        self._leak_key = leak_key  # answers quote the presented key inside their phrases
        self._drip = drip  # seconds between the bytes of a chat reply
        self._gzip = gzip
        self._stats_file = Path(stats_file) if stats_file is not None else None

        self._lock = threading.Lock()
        self._requests_total = 0
        self._chat_requests = 0
        self._misbehaved = 0
        self._sent_429 = 0
        self._sent_500 = 0
        self._json_schema_rejected = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._last_activity = time.monotonic()
        self._keys: dict[tuple[str, str], _KeyStats] = {}
        self._bodies: list[dict[str, Any]] = []
        self._paths: list[str] = []

        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LLMServer:
        with self._stop_lock:
            if self._httpd is not None:
                raise RuntimeError("an LLMServer starts once")
            self._httpd = _HTTPServer(self)
        with self._lock:
            self._last_activity = time.monotonic()
            self._write_stats_file()
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="llm-server", daemon=True),
            threading.Thread(target=self._watch_idle, name="llm-server-idle", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open connections; idempotent, safe from any thread."""
        with self._stop_lock:
            httpd = self._httpd
            if httpd is None:
                return
            first = not self._stopping.is_set()
            self._stopping.set()
        if not first:
            self._stopped.wait()
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        self._threads[0].join()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (by stop() or idle timeout); True if it has."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _watch_idle(self) -> None:
        interval = min(0.5, self._idle_timeout / 10)
        while not self._stopping.wait(interval):
            with self._lock:
                idle = self._in_flight == 0 and time.monotonic() - self._last_activity >= self._idle_timeout
            if idle:
                self.stop()
                return

    # -- observations ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters, JSON-ready (the stats file holds the same)."""
        with self._lock:
            return self._stats_unlocked()

    @property
    def requests_total(self) -> int:
        with self._lock:
            return self._requests_total

    @property
    def request_paths(self) -> list[str]:
        """Paths (with query strings) of POST requests, in arrival order."""
        with self._lock:
            return list(self._paths)

    @property
    def request_bodies(self) -> list[dict[str, Any]]:
        """Authorized chat request bodies, in arrival order."""
        with self._lock:
            return list(self._bodies)

    def planned_misbehaviour(self, class_name: str, kind: str) -> str | None:
        """What the first answered request for (class, kind) does; None means it answers well."""
        if class_name in self._always:
            return self._always[class_name]
        digest = self._digest(class_name, kind)
        if int.from_bytes(digest[:8], "big") >= self._fraction * 2**64:
            return None
        return self._misbehaviours[int.from_bytes(digest[8:16], "big") % len(self._misbehaviours)]

    def _digest(self, class_name: str, kind: str) -> bytes:
        return hashlib.sha256(f"{self._seed}\0{class_name}\0{kind}".encode()).digest()

    def _stats_unlocked(self) -> dict[str, Any]:
        by_class: dict[str, dict[str, dict[str, int]]] = {}
        for (class_name, kind), key_stats in self._keys.items():
            by_class.setdefault(class_name, {})[kind] = dict(vars(key_stats))
        return {
            "requests_total": self._requests_total,
            "chat_requests": self._chat_requests,
            "misbehaved": self._misbehaved,
            "sent_429": self._sent_429,
            "sent_500": self._sent_500,
            "json_schema_rejected": self._json_schema_rejected,
            "max_in_flight": self._max_in_flight,
            "by_class": by_class,
        }

    def _write_stats_file(self) -> None:
        """Called under the lock, so snapshots land in order; os.replace makes each one atomic."""
        if self._stats_file is None:
            return
        tmp = self._stats_file.with_name(f"{self._stats_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._stats_unlocked(), indent=1))
        os.replace(tmp, self._stats_file)

    # -- request handling (called from handler threads) ------------------------------------

    @contextmanager
    def _activity(self) -> Iterator[None]:
        with self._lock:
            self._requests_total += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            self._last_activity = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_activity = time.monotonic()
                self._write_stats_file()

    def _authorized(self, authorization: str | None) -> bool:
        return self._api_key is None or authorization == f"Bearer {self._api_key}"

    def _unauthorized(self) -> _Reply:
        return _Reply(401, _error("invalid_request_error", "Incorrect API key provided.", "invalid_api_key"))

    def _models(self, authorization: str | None) -> _Reply:
        if not self._authorized(authorization):
            return self._unauthorized()
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "msta-tests"}
        return _Reply(200, {"object": "list", "data": [model]})

    def _chat(self, authorization: str | None, raw: bytes) -> _Reply:
        with self._lock:
            self._chat_requests += 1
            sequence = self._chat_requests
        if not self._authorized(authorization):
            return self._unauthorized()
        try:
            body = json.loads(raw)
        except ValueError:
            return _Reply(400, _error("invalid_request_error", "the request body is not valid JSON"))
        if isinstance(body, dict):
            with self._lock:
                self._bodies.append(body)
        try:
            ask = _parse_ask(body)
        except _BadRequest as exc:
            return _Reply(400, _error("invalid_request_error", str(exc)))

        key = (ask.class_name, ask.kind)
        with self._lock:
            key_stats = self._keys.setdefault(key, _KeyStats())
            key_stats.requests += 1
            if key_stats.accepted:
                key_stats.after_accepted += 1
            generic_500 = sequence <= self._fail_first
            rejected = self.reject_json_schema and ask.response_format == "json_schema" and not generic_500
            misbehaviour = None
            if generic_500:
                self._sent_500 += 1
            elif rejected:
                self._sent_500 += 1
                self._json_schema_rejected += 1
            else:
                # Decided and recorded under one lock so that concurrent first attempts misbehave once.
                misbehaviour = self._always.get(ask.class_name)
                if misbehaviour is None and key_stats.misbehaved == 0:
                    misbehaviour = self.planned_misbehaviour(*key)
                if misbehaviour is not None:
                    key_stats.misbehaved += 1
                    self._misbehaved += 1
                if misbehaviour == "429":
                    self._sent_429 += 1
                elif misbehaviour == "500":
                    self._sent_500 += 1
            # Arrivals show in the stats file at once, even if the client dies before the answer.
            self._write_stats_file()

        if generic_500:
            return _Reply(500, _error("server_error", "The server had an error while processing your request."))
        if rejected:
            # llama.cpp's server fails this way (HTTP 500) on json_schema, at parse time.
            message = f'response_format type must be one of "text" or "json_object", but got: {ask.response_format}'
            return _Reply(500, {"error": {"code": 500, "message": message, "type": "server_error"}})
        if misbehaviour == "429":
            headers = {"Retry-After": str(self._retry_after)}
            quoted = f" for key {authorization.removeprefix('Bearer ')}" if self._echo_key and authorization else ""
            error = _error("requests", f"Rate limit reached for requests{quoted}. Please try again.",
                           "rate_limit_exceeded")
            return _Reply(429, error, headers)
        if misbehaviour == "500":
            message = "The server had an error while processing your request. Sorry about that!"
            return _Reply(500, _error("server_error", message), delay=self._latency)

        leak = authorization.removeprefix("Bearer ") if self._leak_key and authorization else ""
        content, finish_reason = self._content(ask, None if misbehaviour in HOSTILE else misbehaviour, leak)
        if ask.max_tokens is not None and count_tokens(content) > ask.max_tokens:
            # Real endpoints stop generating at max_tokens: the answer is cut, finish_reason "length".
            content = content[: list(_TOKEN_RE.finditer(content))[ask.max_tokens - 1].end()]
            finish_reason = "length"
        completion_tokens = count_tokens(content)
        completion = {
            "id": f"chatcmpl-{self._seed}-{sequence:08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ask.model,
            "system_fingerprint": "fp_msta_test",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": ask.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": ask.prompt_tokens + completion_tokens,
            },
        }
        if misbehaviour in HOSTILE:
            return self._hostile(misbehaviour, completion, key)
        acceptable = misbehaviour in (None, "bullets") and finish_reason == "stop"
        return _Reply(200, completion, delay=self._latency, accepted_key=key if acceptable else None)

    def _hostile(self, misbehaviour: str, completion: dict[str, Any], key: tuple[str, str]) -> _Reply:
        """A well-formed completion (content: the valid answer) broken as `misbehaviour` says."""
        message = completion["choices"][0]["message"]
        accepted = None
        match misbehaviour:
            case "sse":
                chunk = {**completion, "object": "chat.completion.chunk"}
                data = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
                return _Reply(200, {}, raw=("text/event-stream", data), delay=self._latency)
            case "html":
                page = b"<!DOCTYPE html><html><body><h1>Sign in to continue</h1></body></html>"
                return _Reply(200, {}, raw=("text/html; charset=utf-8", page), delay=self._latency)
            case "content_object":
                message["content"] = json.loads(message["content"])
                accepted = key
            case "content_number":
                message["content"] = 42
            case "usage_null":
                completion["usage"] = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}
                accepted = key
            case "empty_choice":
                completion["choices"] = [{}]
            case "error_200":
                return _Reply(200, _error("server_error", "upstream model overloaded", 503), delay=self._latency)
            case "deep_nesting":
                message["content"] = "[" * DEEP + "]" * DEEP
            case "deep_body":  # json.dumps cannot write it: splice it into the body
                message["content"] = "@deep@"
                data = json.dumps(completion).replace('"@deep@"', "[" * DEEP + "]" * DEEP).encode()
                return _Reply(200, {}, raw=("application/json", data), delay=self._latency)
            case "gzip_bomb":
                return _Reply(200, {}, headers={"Content-Encoding": "gzip"}, raw=("application/json", gzip_bomb()),
                              delay=self._latency)
            case "tool_calls":
                message["content"] = None
                message["tool_calls"] = [{"id": "call_0", "type": "function",
                                          "function": {"name": "describe", "arguments": "{}"}}]
                completion["choices"][0]["finish_reason"] = "tool_calls"
            case _:
                raise AssertionError(misbehaviour)
        return _Reply(200, completion, delay=self._latency, accepted_key=accepted)

    def _content(self, ask: _Ask, misbehaviour: str | None, leak: str = "") -> tuple[str, str]:
        """(message content, finish_reason) for a 200 answer, well-formed or broken on purpose;
        `leak` is appended to every phrase."""
        n = ask.count
        phrases = [f"{p} (key {leak})" if leak else p for p in descriptions_for(ask.class_name, ask.kind, n)]
        digest = self._digest(ask.class_name, ask.kind)
        items: list[Any]
        match misbehaviour:
            case None:
                items = phrases
            case "non_json":
                activity = activity_words(ask.class_name)
                prose = (
                    f"Sure! In a video of {activity}, a person usually repeats one main movement for a few "
                    "seconds while the background stays still. Let me know if you would like more detail."
                )
                return prose, "stop"
            case "wrong_count":
                wrong = n + 1 if n == 1 or digest[16] & 1 else n - 1
                items = descriptions_for(ask.class_name, ask.kind, wrong)
            case "empty_string":
                items = list(phrases)
                items[digest[17] % n] = ""
            case "echo_class":
                items = [ask.class_name] * n
            case "duplicate":
                # With N=1 a duplicate cannot keep the count; it then also breaks the count.
                items = phrases[:-1] + [phrases[0]] if n > 1 else phrases * 2
            case "bullets":
                items = [f'{i + 1}. "{p}"' if i % 2 == 0 else f'- "{p}"' for i, p in enumerate(phrases)]
            case "truncated":
                text = json.dumps({"descriptions": phrases})
                return text[: len(text) // 2], "length"
            case "objects":
                items = [{"index": i + 1, "description": p} for i, p in enumerate(phrases)]
            case _:
                raise AssertionError(misbehaviour)
        return json.dumps({"descriptions": items}), "stop"

    def _record_accepted(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._keys[key].accepted += 1
            self._write_stats_file()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many clients connect at once; the default backlog of 5 makes extra connects stall for seconds.
    request_queue_size = 128

    def __init__(self, app: LLMServer) -> None:
        self.app = app
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._closing = False
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn, a DNS lookup that can hang in sandboxes.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Keep-alive connections outlive serve_forever; tracking them lets stop() cut them.
        with self._connections_lock:
            if self._closing:
                return
            self._connections.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            self._closing = True
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-answer (its own timeout, or stop()) is routine, not a server bug.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints and the client's connection pool expect
    # Headers and body go out as separate small writes; with Nagle's algorithm on, the body then waits
    # for the client's delayed ACK (~40 ms on Linux), a cost no real endpoint adds to each answer.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def do_GET(self) -> None:
        app = self.server.app
        if self.path == "/_stats":  # the counters, for a benchmark: cheaper than --stats-file, not counted
            self._read_body()
            self._send(_Reply(200, app.stats()))
            return
        with app._activity():
            self._read_body()
            if urlsplit(self.path).path.rstrip("/") == "/v1/models":
                self._send(app._models(self.headers.get("Authorization")))
            else:
                self._send(self._not_found())

    def do_POST(self) -> None:
        app = self.server.app
        with app._activity():
            raw = self._read_body()
            with app._lock:
                app._paths.append(self.path)
            if urlsplit(self.path).path.rstrip("/") != "/v1/chat/completions":
                self._send(self._not_found())
                return
            reply = app._chat(self.headers.get("Authorization"), raw)
            if reply.delay > 0:
                time.sleep(reply.delay)
                if self._client_gone():  # it timed out meanwhile: this answer never reaches it
                    self.close_connection = True
                    return
            # Recorded before sending, so the stats are up to date once the client has the answer.
            if reply.accepted_key is not None:
                app._record_accepted(reply.accepted_key)
            if app._gzip and reply.raw is None:
                packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
                data = packer.compress(json.dumps(reply.body).encode()) + packer.flush()
                reply.raw, reply.headers = ("application/json", data), {**reply.headers, "Content-Encoding": "gzip"}
            if app._drip > 0:
                self._drip(reply, app._drip)
            else:
                self._send(reply)

    def _read_body(self) -> bytes:
        # Read the whole body even when it is not used, or the next request on this connection breaks.
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return not self.connection.recv(1, socket.MSG_PEEK)  # EOF: the client closed
        except OSError:
            return True

    def _not_found(self) -> _Reply:
        return _Reply(404, _error("invalid_request_error", f"Invalid URL ({self.command} {self.path})"))

    def _send(self, reply: _Reply) -> None:
        content_type, data = reply.raw or ("application/json", json.dumps(reply.body).encode())
        self.send_response(reply.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _drip(self, reply: _Reply, every: float) -> None:
        """The reply, status line first, one byte per `every` seconds, until done or stopped."""
        content_type, data = reply.raw or ("application/json", json.dumps(reply.body).encode())
        headers = {"Content-Type": content_type, "Content-Length": str(len(data)), **reply.headers}
        head = (f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
                + "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n").encode()
        self.close_connection = True
        payload = head + data
        for i in range(len(payload)):
            if self.server.app._stopping.wait(every):
                return
            self.wfile.write(payload[i : i + 1])

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown test output


def _stop_on_stdin_eof(server: LLMServer) -> None:
    while os.read(sys.stdin.fileno(), 65536):
        pass
    server.stop()


def _stdin_is_pipe() -> bool:
    # Only a pipe (or socket) closing means "the parent is done"; /dev/null or a file reads EOF at
    # once, which happens to background jobs of non-interactive shells.
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def main(argv: list[str] | None = None) -> int:
    # Read first: a parent that dies right after reading the URL must not go unnoticed.
    parent = os.getppid()
    parser = argparse.ArgumentParser(description="OpenAI-compatible chat-completions test server")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--misbehave-fraction", type=float, default=0.0)
    parser.add_argument("--misbehaviours", help=f"comma-separated subset of {','.join(MISBEHAVIOURS)}")
    parser.add_argument(
        "--always-misbehave", action="append", default=[], metavar="CLASS=MISBEHAVIOUR", help="repeatable"
    )
    parser.add_argument("--reject-json-schema", action="store_true")
    parser.add_argument("--require-api-key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle-timeout", type=float, default=600.0)
    parser.add_argument("--retry-after", default="0", help="Retry-After header on 429 (seconds, or any string)")
    parser.add_argument("--stats-file", help="JSON counters, rewritten atomically after every request")
    args = parser.parse_args(argv)

    if any("=" not in item for item in args.always_misbehave):
        parser.error("--always-misbehave takes CLASS=MISBEHAVIOUR")
    always = dict(item.rsplit("=", 1) for item in args.always_misbehave)
    server = LLMServer(
        latency=args.latency,
        misbehave_fraction=args.misbehave_fraction,
        misbehaviours=args.misbehaviours.split(",") if args.misbehaviours else None,
        always_misbehave=always,
        reject_json_schema=args.reject_json_schema,
        require_api_key=args.require_api_key,
        seed=args.seed,
        idle_timeout=args.idle_timeout,
        retry_after=args.retry_after,
        stats_file=args.stats_file,
    )
    server.start()
    print(server.base_url, flush=True)
    if _stdin_is_pipe():
        threading.Thread(target=_stop_on_stdin_eof, args=(server,), name="llm-server-stdin", daemon=True).start()
    while not server.wait(0.5):
        if os.getppid() != parent:  # reparented: the parent died
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
