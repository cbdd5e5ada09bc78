"""Hostile answers are bounded (issue 23): an endpoint cannot make describe store the API key,
run past --timeout, hold more than the answer cap in memory, spin on quadratic parsing, or crash
(now and on every rerun) with an answer nested past Python's recursion limit."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cache.catalog import Catalog
from prompts.answers import parse_answer
from prompts.llm import LLMClient, LLMError, LLMSampling, Recorder, normalise_endpoint
from tests.llm_server import DEEP, LLMServer

from .conftest import ROOT, catalog_rows, cli_env, run_cli
from .test_describe import CLASSES, describe
from .test_llm_hostile import assert_one_line

SECRET = "sk-proj-Zq8v0AbCdEfGh1234567890"


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    p = tmp_path / "labels.csv"
    p.write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(CLASSES)))
    return p


def test_an_answer_quoting_the_key_stores_it_nowhere(home: Path, labels: Path) -> None:
    """The key is masked in the answer before the journal, llm_requests, descriptions and the artifact."""
    env = cli_env(OPENAI_API_KEY=SECRET)
    with LLMServer(leak_key=True) as server:
        r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--base-url", server.base_url,
                    "--kind", "spatial", env=env)
    assert r.returncode == 0, r.stderr
    phrases = [p for (p,) in catalog_rows(home, "SELECT phrase FROM descriptions")]
    assert len(phrases) == 10 and all(p.endswith("(key ***)") for p in phrases)  # it was there, and masked
    outputs = [r.stdout, r.stderr]
    for table in ("descriptions", "llm_requests", "runs"):
        sql = run_cli("sql", f"SELECT * FROM {table}", "--format", "csv", "--home", home, env=env)
        assert sql.returncode == 0, sql.stderr
        outputs += [sql.stdout, sql.stderr]
    assert all(SECRET not in text for text in outputs)
    files = [p for p in home.rglob("*") if p.is_file()]
    assert all(SECRET.encode() not in p.read_bytes() for p in files)
    tables = [p for p in files if p.suffix == ".parquet"]
    assert tables and all(SECRET not in str(pq.read_table(p).to_pylist()) for p in tables)  # compression hides nothing


@pytest.mark.parametrize("url, key", [
    ("http://127.0.0.1:{port}/sk-live-abcdef123456/v1?code=Y", ""),  # the example
    ("http://127.0.0.1:{port}/v1?code=hunter2-secret", ""),
    ("http://127.0.0.1:{port}/v1/a1B2c3D4e5F6g7H8i9J0k1L2", ""),  # a long letter+digit token
    ("http://127.0.0.1:{port}/v1?deployment=a1B2c3D4e5F6g7H8i9J0k1L2", ""),
    ("http://127.0.0.1:{port}/pk_test%5Fabcdef/v1", ""),  # percent-encoded
    ("http://127.0.0.1:{port}/correct-horse-battery-staple/v1", "correct-horse-battery-staple"),  # the key itself
])
def test_a_secret_in_the_base_url_path_or_query_is_refused(home: Path, labels: Path, url: str, key: str) -> None:
    with LLMServer() as server:
        port = server.base_url.split(":")[2].split("/")[0]
        url = url.format(port=port)
        r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--base-url", url,
                    env=cli_env(OPENAI_API_KEY=key) if key else None)
        assert server.requests_total == 0
    assert r.returncode == 2
    line = assert_one_line(r.stderr)
    assert "credentials" in line and "OPENAI_API_KEY" in line
    for secret in ("sk-live-abcdef123456", "hunter2-secret", "a1B2c3D4e5F6g7H8i9J0k1L2", "pk_test", "correct-horse"):
        assert secret not in r.stdout + r.stderr
    assert not (home / "catalog.duckdb").exists() or \
        catalog_rows(home, "SELECT count(*) FROM runs WHERE stage = 'describe'") == [(0,)]


@pytest.mark.parametrize("url", [
    "https://res.openai.azure.com/openai/deployments/gpt-35-turbo-16k-0613?api-version=2024-02-01",
    "http://127.0.0.1:8000/v1", "https://api.together.xyz/v1", "http://localhost:11434/v1",
    "https://example.com/org/550e8400-e29b-41d4-a716-446655440000/v1",
])
def test_ordinary_base_urls_are_kept(url: str) -> None:
    assert normalise_endpoint(url) == url


def test_gzip_answers_are_read_as_before(home: Path, labels: Path) -> None:
    """Real endpoints compress their answers: decoding them ourselves (to bound them) changes nothing."""
    with LLMServer(gzip=True, misbehave_fraction=1.0, misbehaviours=["429", "non_json"]) as server:
        describe(home, labels, server)
    assert catalog_rows(home, "SELECT count(*) FROM descriptions") == [(10,)]


def _parse_seconds(content: str, limit: float = 30.0) -> tuple[float, list[str]]:
    """parse_answer(content) timed in a child process killed after `limit` s, so that a quadratic
    parser fails the test instead of hanging it."""
    code = ("import json, sys, time; from prompts.answers import parse_answer; text = sys.stdin.read(); "
            "t = time.perf_counter(); items, why = parse_answer(text, 2); "
            "print(json.dumps([time.perf_counter() - t, why]))")
    try:
        r = subprocess.run([sys.executable, "-c", code], input=content, capture_output=True, text=True, cwd=ROOT,
                           timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"parse_answer ran past {limit} s on {len(content):,} characters")
    assert r.returncode == 0, r.stderr
    seconds, why = json.loads(r.stdout)
    return seconds, why


MB = 2**20


@pytest.mark.parametrize("content", [
    "x" + " " * MB + "x",  # the fence pattern's `\s*```$` rescanned every whitespace run
    "{" * MB,  # `\{.*\}` rescanned the rest of the text from every brace
    "{" + " " * MB + "x",
], ids=["whitespace", "braces", "brace-whitespace"])
def test_a_megabyte_of_hostile_text_parses_in_linear_time(content: str) -> None:
    seconds, why = _parse_seconds(content)
    assert seconds < 5, seconds  # ~0.01 s; the old parser took minutes (40 kB of whitespace: 3 s)
    assert why and why[0].startswith("the answer is not JSON")


@pytest.mark.parametrize("content", ["[" * DEEP + "]" * DEEP, '{"a": ' * DEEP + "1" + "}" * DEEP,
                                     '{"descriptions": ' + "[" * DEEP + "]" * DEEP + "}"])
def test_an_answer_nested_past_the_recursion_limit_is_not_json(content: str) -> None:
    items, why = parse_answer(content, 2)
    assert items is None and len(why) == 1 and why[0].startswith("the answer is not JSON")


def test_a_deeply_nested_answer_is_asked_again_and_a_rerun_replays_it(home: Path, labels: Path) -> None:
    with LLMServer(misbehave_fraction=1.0, misbehaviours=["deep_nesting"]) as server:
        describe(home, labels, server)  # each class's first answer is [[[...]]]; its re-ask behaves
        reasks = [b["messages"][-1]["content"] for b in server.request_bodies if len(b["messages"]) > 2]
        assert len(reasks) == 5 and all("the answer is not JSON" in m for m in reasks)
        sent = server.requests_total
        describe(home, labels, server)  # the cached nested answers replay without a crash
        assert server.requests_total == sent
    assert catalog_rows(home, "SELECT count(*) FROM llm_requests WHERE status = 'ok' AND response LIKE '[[[%'") \
        == [(5,)]
    assert catalog_rows(home, "SELECT count(*) FROM descriptions") == [(10,)]


def test_a_server_dripping_its_reply_is_cut_at_the_timeout(home: Path) -> None:
    """One byte every 0.2 s resets a per-read timeout forever; the attempt's wall clock does not."""
    with LLMServer(drip=0.2) as server:
        guard = threading.Timer(40, server.stop)  # the old client read the drip to its end (minutes)
        guard.start()
        recorder = Recorder(Catalog(home), home / "journal")
        client = LLMClient(server.base_url, "m", "test-key", LLMSampling(0.0, 64, None), recorder, timeout=1.0,
                           http_retries=1)
        messages = [{"role": "user", "content": "Class: waving\nKind: spatial\nWrite exactly 2 phrases."}]
        started = time.monotonic()
        try:
            with pytest.raises(LLMError, match="no answer after 2 attempts"):
                client.complete(messages, {"type": "json_object"}, "k" * 64, {})
        finally:
            elapsed = time.monotonic() - started
            guard.cancel()
            recorder.close()
    assert elapsed < 20, elapsed  # two attempts of 1 s and a backoff
    errors = [e for (e,) in catalog_rows(home, "SELECT error FROM llm_requests ORDER BY created_at")]
    assert len(errors) == 2 and all("within 1 s" in e for e in errors), errors


def test_a_gzip_bomb_is_cut_at_the_answer_cap(home: Path, labels: Path) -> None:
    """~100 kB that inflate to 100 MB: the attempt ends as one error line, memory grows by about the cap."""
    def peak_rss_mb(server: LLMServer, run_home: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
        cmd = [sys.executable, "-m", "pipeline", "describe", "-d", "toy", "--labels", str(labels), "--home",
               str(run_home), "--base-url", server.base_url, "--kind", "spatial", "--no-progress"]
        code = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
                "text=True); print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode, "
                "r.stdout, r.stderr]))")
        out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=ROOT,
                             env=cli_env(), timeout=300)
        rss_kb, rc, stdout, stderr = json.loads(out.stdout)
        return rss_kb / 1024, subprocess.CompletedProcess(cmd, rc, stdout, stderr)

    with LLMServer() as server:
        baseline, ok = peak_rss_mb(server, home.with_name("baseline"))
    assert ok.returncode == 0, ok.stderr
    with LLMServer(misbehave_fraction=1.0, misbehaviours=["gzip_bomb"]) as server:
        bombed, r = peak_rss_mb(server, home)
    assert r.returncode == 1 and "5 of 5 classes" in assert_one_line(r.stderr)
    reasons = {reason for (reason,) in catalog_rows(home, "SELECT reason FROM description_failures")}
    assert len(reasons) == 1 and "answer larger than 4 MB" in reasons.pop(), reasons
    assert bombed - baseline < 64, (baseline, bombed)  # the old client held the 100 MB (and copies of it)
