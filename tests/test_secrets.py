"""No secret reaches a table, a log or the terminal, and stored errors are one line: the API key
(from the environment), bearer tokens, sk-... keys and URL credentials are scrubbed wherever an
error is recorded (the runner, llm_requests) or printed (the CLI, `status`)."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from cache.errors import error_line, one_line, scrub
from pipeline import cli
from tests.llm_server import LLMServer

from .conftest import catalog_rows, cli_env, run_cli

SECRET = "sk-proj-Zq8v0AbCdEfGh1234567890"


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    p = tmp_path / "labels.txt"
    p.write_text("waving\nclapping\n")
    return p


def _no_secret_anywhere(home: Path, *outputs: str, secret: str = SECRET) -> None:
    for text in outputs:
        assert secret not in text
    for path in home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_scrub_masks_every_shape_of_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "plain-key-without-prefix-42")
    text = ("key plain-key-without-prefix-42; Authorization: Bearer abc.def-123; sk-live-0123456789abcdef; "
            "https://bob:hunter22@llm.example.com/v1?api-version=2024-06-01&api-key=zzz999")
    clean = scrub(text)
    for leaked in ("plain-key-without-prefix-42", "abc.def-123", "0123456789abcdef", "hunter22", "zzz999"):
        assert leaked not in clean
    assert "api-version=2024-06-01" in clean and "llm.example.com/v1" in clean  # what is not secret stays
    assert one_line("Traceback (most recent call last):\n  File x\nValueError: Bearer tok12345") == \
        "Traceback (most recent call last):"
    try:
        raise RuntimeError(f"boom with {SECRET}\nsecond line")
    except RuntimeError as exc:
        line = error_line(exc)
    assert line.startswith("RuntimeError: boom with sk-***") and "\n" not in line and "test_secrets.py:" in line


def test_429_echoing_the_key_with_a_bad_retry_after_leaks_nothing(home: Path, labels: Path) -> None:
    """The endpoint quotes the key in its 429 body and sends `Retry-After: nan`: the run retries
    (the header falls back to backoff) and the key is in no file of the home and no output."""
    with LLMServer(misbehave_fraction=1.0, misbehaviours=["429"], retry_after="nan", echo_key=True) as server:
        r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--base-url", server.base_url,
                    "--kind", "spatial", env=cli_env(OPENAI_API_KEY=SECRET))
        assert server.stats()["sent_429"] == 2
    assert r.returncode == 0, r.stderr
    errors = [e for (e,) in catalog_rows(home, "SELECT error FROM llm_requests WHERE status = 'error'")]
    assert len(errors) == 2 and all(e.startswith("HTTP 429: Rate limit reached") and "***" in e for e in errors)
    _no_secret_anywhere(home, r.stdout, r.stderr)


def test_a_failed_run_stores_one_scrubbed_line_and_status_prints_it(home: Path, labels: Path, tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"0": ["A video about a hand.", "A video about an arm."], "1": ["A video about one."]}))
    r = run_cli("describe", "-d", "toy", "--labels", labels, "--from-file", f, "--kind", "spatial", "--home", home)
    assert r.returncode == 1
    (error,) = catalog_rows(home, "SELECT error FROM runs WHERE status = 'failed'")[0]
    assert "\n" not in error and error.startswith("1 of 2 classes")
    # A catalog written by an older version holds whole tracebacks, keys included: status shows one line.
    con = duckdb.connect(str(home / "catalog.duckdb"))
    con.execute("UPDATE runs SET error = ? WHERE status = 'failed'",
                [f"RateLimitError: Error code: 429 for key {SECRET}\nTraceback (most recent call last):\n"
                 f'  File "stages/llm.py", line 236\nValueError: sleep length must be non-negative\n'])
    con.close()
    status = run_cli("status", "--home", home, env=cli_env(OPENAI_API_KEY=SECRET))
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("describe:toy:spatial"))
    assert "failed" in line and line.endswith("RateLimitError: Error code: 429 for key ***")
    assert "Traceback" not in status.stdout and SECRET not in status.stdout + status.stderr


def test_an_unexpected_error_is_one_scrubbed_line_without_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    def crash(**_: object) -> None:
        raise KeyError(f"Authorization: Bearer {SECRET}\nmore")

    monkeypatch.setattr(cli, "app", crash)
    monkeypatch.delenv("MSTA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: KeyError:") and "MSTA_TRACEBACK" in err
    assert SECRET not in err and "Traceback" not in err


@pytest.mark.parametrize("url", ["http://user:hunter2-secret@127.0.0.1:{port}/v1",
                                 "http://127.0.0.1:{port}/v1?api-key=hunter2-secret"])
def test_credentials_in_base_url_are_refused_never_dropped_or_printed(home: Path, labels: Path, url: str) -> None:
    with LLMServer() as server:
        port = server.base_url.split(":")[2].split("/")[0]
        r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--base-url", url.format(port=port))
        assert server.requests_total == 0
    assert r.returncode == 2 and "credentials" in r.stderr and "OPENAI_API_KEY" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    _no_secret_anywhere(home, r.stdout, r.stderr, secret="hunter2-secret")


def test_query_string_of_base_url_is_sent_with_every_request(home: Path, labels: Path) -> None:
    """Azure-style endpoints need ?api-version=...: it used to be dropped silently."""
    with LLMServer() as server:
        r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--kind", "spatial",
                    "--base-url", server.base_url + "?api-version=2024-06-01")
        paths = server.request_paths
    assert r.returncode == 0, r.stderr
    assert paths and all(p == "/v1/chat/completions?api-version=2024-06-01" for p in paths)
    (params,) = catalog_rows(home, "SELECT params FROM runs WHERE stage = 'describe'")[0]
    assert json.loads(params)["endpoint"].endswith("/v1?api-version=2024-06-01")
