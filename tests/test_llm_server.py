"""The test LLM server, exercised through the real `openai` client over real sockets."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion

from tests.llm_server import MISBEHAVIOURS, MODEL_ID, LLMServer, descriptions_for

SERVER_SCRIPT = Path(__file__).with_name("llm_server.py")


def schema_format(n: int) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {"descriptions": {"type": "array", "items": {"type": "string"}, "minItems": n, "maxItems": n}},
        "required": ["descriptions"],
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": "descriptions", "strict": True, "schema": schema}}


JSON_OBJECT: dict[str, Any] = {"type": "json_object"}


def ask(
    client: OpenAI,
    class_name: str = "PushUps",
    kind: str = "spatial",
    n: int = 4,
    response_format: dict[str, Any] | None = JSON_OBJECT,
    max_tokens: int = 1024,
) -> ChatCompletion:
    """A describe-shaped request; response_format=None leaves the field out."""
    user = f"Describe an action class.\nClass: {class_name}\nKind: {kind}\nWrite exactly {n} short phrases."
    extra = {} if response_format is None else {"response_format": response_format}
    return client.chat.completions.create(
        model="any-model",
        messages=[{"role": "system", "content": "You write JSON."}, {"role": "user", "content": user}],
        temperature=0.0,
        max_tokens=max_tokens,
        seed=0,
        **extra,  # type: ignore[arg-type]
    )


def descriptions(completion: ChatCompletion) -> list[Any]:
    content = completion.choices[0].message.content
    assert content is not None
    return json.loads(content)["descriptions"]


def client_for(server: LLMServer, api_key: str = "test") -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture
def server() -> Iterator[LLMServer]:
    with LLMServer() as running:
        yield running


def test_valid_answer_with_json_schema(server: LLMServer) -> None:
    completion = ask(client_for(server), "ApplyEyeMakeup", "temporal", n=5, response_format=schema_format(5))

    phrases = descriptions(completion)
    assert phrases == descriptions_for("ApplyEyeMakeup", "temporal", 5)
    assert len(set(phrases)) == 5 and all(p and p != "ApplyEyeMakeup" for p in phrases)
    assert "apply eye makeup" in phrases[0]
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "any-model"
    assert completion.usage is not None and completion.usage.completion_tokens > 5 * 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert server.request_bodies[0]["response_format"]["type"] == "json_schema"
    assert server.stats()["by_class"] == {
        "ApplyEyeMakeup": {"temporal": {"requests": 1, "misbehaved": 0, "accepted": 1, "after_accepted": 0}}
    }


def test_phrases_are_distinct_across_classes_kinds_and_many_indices() -> None:
    many = descriptions_for("Jump", "spatial", 400)
    assert len(set(many)) == 400
    assert set(descriptions_for("Jump", "spatial", 5)).isdisjoint(descriptions_for("Jump", "temporal", 5))
    assert set(descriptions_for("Jump", "spatial", 5)).isdisjoint(descriptions_for("Run", "spatial", 5))


def test_schema_min_items_wins_and_a_re_ask_keeps_the_first_user_message(server: LLMServer) -> None:
    user = "Class: Run\nKind: spatial\nGive exactly 3 phrases."
    completion = client_for(server).chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "s"},
            {"role": "user", "content": user},
            {"role": "assistant", "content": "not json"},
            {"role": "user", "content": "That was invalid. Class: Other\nKind: temporal\nexactly 9"},
        ],
        response_format=schema_format(6),  # type: ignore[arg-type]
    )
    assert descriptions(completion) == descriptions_for("Run", "spatial", 6)


def test_a_request_without_the_describe_lines_is_a_bad_request(server: LLMServer) -> None:
    with pytest.raises(openai.BadRequestError, match="Class"):
        client_for(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])


def test_max_tokens_cuts_the_answer(server: LLMServer) -> None:
    completion = ask(client_for(server), n=4, max_tokens=10)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 10
    assert server.stats()["by_class"]["PushUps"]["spatial"]["accepted"] == 0


def test_json_schema_rejection_then_json_object_fallback() -> None:
    with LLMServer(reject_json_schema=True) as server:
        client = client_for(server)
        with pytest.raises(openai.InternalServerError, match="json_schema"):
            ask(client, n=3, response_format=schema_format(3))
        assert len(descriptions(ask(client, n=3))) == 3
        assert len(descriptions(ask(client, "Run", n=2, response_format=None))) == 2
        stats = server.stats()
    assert stats["json_schema_rejected"] == 1 and stats["sent_500"] == 1 and stats["misbehaved"] == 0


def test_429_carries_retry_after_and_the_next_request_succeeds() -> None:
    with LLMServer(misbehave_fraction=1.0, misbehaviours=["429"], retry_after=1) as server:
        client = client_for(server)
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client)
        assert caught.value.response.headers["retry-after"] == "1"
        assert caught.value.code == "rate_limit_exceeded"
        assert len(descriptions(ask(client))) == 4
        assert server.stats()["sent_429"] == 1


def _check_misbehaviour(name: str, completion: ChatCompletion, n: int) -> None:
    content = completion.choices[0].message.content or ""
    good = descriptions_for("PushUps", "spatial", n)
    if name == "non_json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(content)
        return
    if name == "truncated":
        assert completion.choices[0].finish_reason == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(content)
        return
    items = json.loads(content)["descriptions"]
    if name == "wrong_count":
        assert len(items) in (n - 1, n + 1)
    elif name == "empty_string":
        assert len(items) == n and items.count("") == 1
    elif name == "echo_class":
        assert items == ["PushUps"] * n
    elif name == "duplicate":
        assert len(items) == n and len(set(items)) == n - 1
    elif name == "bullets":
        assert items[0].startswith('1. "') and items[1].startswith('- "')
        assert [item.split(" ", 1)[1].strip('"') for item in items] == good
    elif name == "objects":
        assert [item["description"] for item in items] == good
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("name", MISBEHAVIOURS)
def test_each_misbehaviour_happens_once_then_the_answer_is_valid(name: str) -> None:
    n = 4
    with LLMServer(misbehave_fraction=1.0, misbehaviours=[name]) as server:
        client = client_for(server)
        assert server.planned_misbehaviour("PushUps", "spatial") == name
        if name == "429":
            with pytest.raises(openai.RateLimitError):
                ask(client, n=n)
        elif name == "500":
            with pytest.raises(openai.InternalServerError):
                ask(client, n=n)
        else:
            _check_misbehaviour(name, ask(client, n=n), n)
        assert descriptions(ask(client, n=n)) == descriptions_for("PushUps", "spatial", n)
        key_stats = server.stats()["by_class"]["PushUps"]["spatial"]
    # "bullets" is acceptable after cleaning, so the second request here counts as one too many.
    if name == "bullets":
        assert key_stats == {"requests": 2, "misbehaved": 1, "accepted": 2, "after_accepted": 1}
    else:
        assert key_stats == {"requests": 2, "misbehaved": 1, "accepted": 1, "after_accepted": 0}


def test_misbehaviour_plan_is_a_reproducible_fraction() -> None:
    keys = [(f"class{i}", kind) for i in range(500) for kind in ("spatial", "temporal")]

    def plan(seed: int) -> list[str | None]:
        server = LLMServer(misbehave_fraction=0.2, seed=seed)
        return [server.planned_misbehaviour(c, k) for c, k in keys]

    first = plan(0)
    assert first == plan(0) and first != plan(1)
    assert 0.15 < sum(p is not None for p in first) / len(keys) < 0.25
    assert {p for p in first if p is not None} == set(MISBEHAVIOURS)


def test_always_misbehave_never_answers_well() -> None:
    with LLMServer(always_misbehave={"Bad": "echo_class"}) as server:
        client = client_for(server)
        for _ in range(3):
            assert descriptions(ask(client, "Bad", n=2)) == ["Bad", "Bad"]
        assert len(descriptions(ask(client, "Good", n=2))) == 2
        stats = server.stats()
    assert stats["by_class"]["Bad"]["spatial"] == {"requests": 3, "misbehaved": 3, "accepted": 0, "after_accepted": 0}
    assert stats["misbehaved"] == 3 and stats["chat_requests"] == 4


def test_latency_is_served_concurrently() -> None:
    with LLMServer(latency=0.2) as server:
        client = client_for(server)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: ask(client, f"Class{i}"), range(8)))
        elapsed = time.monotonic() - started
        stats = server.stats()
    assert all(len(descriptions(r)) == 4 for r in results)
    assert 0.2 <= elapsed < 1.2
    assert stats["max_in_flight"] >= 2 and stats["requests_total"] == 8


def test_an_answer_the_client_timed_out_on_is_not_counted_as_accepted() -> None:
    with LLMServer(latency=0.3) as server:
        impatient = OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=0.1)
        with pytest.raises(openai.APITimeoutError):
            ask(impatient)
        time.sleep(0.4)  # the handler wakes, finds the client gone and sends nothing
        assert server.stats()["by_class"]["PushUps"]["spatial"]["accepted"] == 0
        assert len(descriptions(ask(client_for(server)))) == 4
        key_stats = server.stats()["by_class"]["PushUps"]["spatial"]
    assert key_stats == {"requests": 2, "misbehaved": 0, "accepted": 1, "after_accepted": 0}


def test_api_key_is_required() -> None:
    with LLMServer(require_api_key="sekrit") as server:
        with pytest.raises(openai.AuthenticationError):
            ask(client_for(server, api_key="wrong"))
        with pytest.raises(openai.AuthenticationError):
            client_for(server, api_key="wrong").models.list()
        assert len(descriptions(ask(client_for(server, api_key="sekrit")))) == 4


def test_models_list_and_unknown_paths(server: LLMServer) -> None:
    client = client_for(server)
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="m", input="x")
    assert server.base_url.startswith("http://127.0.0.1:")
    assert server.stats()["requests_total"] == 2


def test_idle_timeout_stops_the_server_but_not_mid_request() -> None:
    server = LLMServer(latency=0.6, idle_timeout=0.3).start()
    assert len(descriptions(ask(client_for(server)))) == 4  # longer than idle_timeout, still answered
    assert server.wait(timeout=3)
    with pytest.raises(openai.APIConnectionError):
        ask(client_for(server))


def test_stop_cuts_kept_alive_connections() -> None:
    server = LLMServer().start()
    client = client_for(server)
    ask(client)  # leaves a pooled keep-alive connection open
    server.stop()
    with pytest.raises(openai.APIConnectionError):
        ask(client)


def _read_line(stream: Any, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "the server printed nothing"
    return stream.readline()


def test_standalone_serves_writes_stats_and_exits_when_stdin_closes(tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    command = [sys.executable, str(SERVER_SCRIPT), "--misbehave-fraction", "0", "--stats-file", str(stats_file)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and process.stdin is not None
            url = _read_line(process.stdout, timeout=10).strip()
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
            assert json.loads(stats_file.read_text())["requests_total"] == 0
            client = OpenAI(base_url=url, api_key="test", max_retries=0, timeout=10)
            ask(client, "Run", "temporal")
            assert json.loads(stats_file.read_text())["by_class"]["Run"]["temporal"]["accepted"] == 1
            ask(client, "Run", "temporal")
            stats = json.loads(stats_file.read_text())
            assert stats["requests_total"] == 2
            assert stats["by_class"]["Run"]["temporal"]["after_accepted"] == 1
            # The same counters over HTTP, and asking for them is not counted as a request
            over_http = json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/_stats", timeout=10).read())
            assert over_http == stats
            assert json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/_stats", timeout=10).read()) == stats
            process.stdin.close()
            assert process.wait(timeout=5) == 0
        finally:
            process.kill()


def test_standalone_exits_when_its_parent_dies() -> None:
    # The parent starts the server with stdin from /dev/null (not a pipe, so not watched), prints
    # nothing and waits; the server's stdout is ours, so EOF on it means the server exited.
    parent_code = (
        "import subprocess, sys, time;"
        f"subprocess.Popen([sys.executable, {str(SERVER_SCRIPT)!r}], stdin=subprocess.DEVNULL);"
        "time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            assert _read_line(parent.stdout, timeout=10).startswith("http://127.0.0.1:")
            parent.kill()
            parent.wait()
            assert _read_line(parent.stdout, timeout=5) == ""
        finally:
            parent.kill()
