"""`describe` against endpoints and inputs that break the rules: each ends as valid descriptions or
as one clear line (exit 2 for bad input, 1 for failed work), never a traceback, nothing half-written;
and the endpoint's json_schema capability is learned only from a clear refusal."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cache.errors import UserError
from prompts import PROMPT_DIR
from tests.llm_server import HOSTILE, LLMServer

from .conftest import catalog_rows, run_cli
from .test_describe import CLASSES, describe

# What the class failure says for replies that are not an answer at all (not retried, not cached).
NOT_AN_ANSWER = {
    "sse": "event stream",
    "html": "an HTML page",
    "empty_choice": "holds no message",
    "error_200": "HTTP 200 with an error: upstream model overloaded",
    "tool_calls": "tool calls only",
    "deep_body": "could not be read: RecursionError",
    "gzip_bomb": "answer larger than 4 MB",
}


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    p = tmp_path / "labels.csv"
    p.write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(CLASSES)))
    return p


def cli_describe(home: Path, labels: Path, *args: str | Path):
    return run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, *args)


def assert_one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("misbehaviour", HOSTILE)
def test_each_hostile_reply_is_survived_or_fails_its_classes_in_one_line(home: Path, labels: Path,
                                                                         misbehaviour: str) -> None:
    with LLMServer(misbehave_fraction=1.0, misbehaviours=[misbehaviour]) as server:
        if misbehaviour in NOT_AN_ANSWER:
            with pytest.raises(UserError) as err:
                describe(home, labels, server)
            assert err.value.exit_code == 1 and "5 of 5 classes" in str(err.value)
            reasons = [r for (r,) in catalog_rows(home, "SELECT reason FROM description_failures")]
            assert len(reasons) == 5 and all(NOT_AN_ANSWER[misbehaviour] in r and "\n" not in r for r in reasons)
            assert catalog_rows(home, "SELECT count(*) FROM llm_requests WHERE status = 'ok'") == [(0,)]
        describe(home, labels, server)  # the endpoint behaves now: a rerun completes
    assert catalog_rows(home, "SELECT count(*) FROM descriptions") == [(10,)]


def test_hostile_reply_through_the_cli_is_one_line(home: Path, labels: Path) -> None:
    with LLMServer(misbehave_fraction=1.0, misbehaviours=["html"]) as server:
        r = cli_describe(home, labels, "--base-url", server.base_url, "--kind", "spatial")
    assert r.returncode == 1
    assert "5 of 5 classes" in assert_one_line(r.stderr)
    assert catalog_rows(home, "SELECT count(*) FROM descriptions") == [(0,)]


@pytest.mark.parametrize("retry_after", ["-5", "nan", "inf", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_bad_retry_after_falls_back_to_backoff(home: Path, labels: Path, retry_after: str) -> None:
    with LLMServer(misbehave_fraction=1.0, misbehaviours=["429"], retry_after=retry_after) as server:
        describe(home, labels, server)
        assert server.stats()["sent_429"] == 5
    assert catalog_rows(home, "SELECT count(*) FROM descriptions") == [(10,)]


def test_a_wrong_url_teaches_nothing_and_the_fixed_url_uses_json_schema(home: Path, labels: Path) -> None:
    with LLMServer() as server:
        wrong = cli_describe(home, labels, "--base-url", server.base_url.replace("/v1", "/wrong"), "--kind", "spatial")
        assert wrong.returncode == 1 and "HTTP 404" in wrong.stdout
        assert catalog_rows(home, "SELECT count(*) FROM llm_endpoints") == [(0,)]
        fixed = cli_describe(home, labels, "--base-url", server.base_url, "--kind", "spatial")
        assert fixed.returncode == 0, fixed.stderr
        formats = {b["response_format"]["type"] for b in server.request_bodies}
    assert formats == {"json_schema"}
    assert catalog_rows(home, "SELECT json_schema FROM llm_endpoints") == [(True,)]


def test_two_500s_on_the_first_request_are_not_a_refusal(home: Path, labels: Path) -> None:
    with LLMServer(fail_first=2) as server:
        describe(home, labels, server)
        formats = {b["response_format"]["type"] for b in server.request_bodies}
    assert formats == {"json_schema"}
    assert catalog_rows(home, "SELECT json_schema FROM llm_endpoints") == [(True,)]
    assert catalog_rows(home, "SELECT count(*) FROM descriptions") == [(10,)]


def test_describe_force_forgets_what_was_learned_about_the_endpoint(home: Path, labels: Path) -> None:
    with LLMServer(reject_json_schema=True) as server:
        assert cli_describe(home, labels, "--base-url", server.base_url, "--kind", "spatial").returncode == 0
        assert catalog_rows(home, "SELECT json_schema FROM llm_endpoints") == [(False,)]
        server.reject_json_schema = False  # the endpoint was upgraded
        seen = len(server.request_bodies)
        again = cli_describe(home, labels, "--base-url", server.base_url, "--kind", "spatial", "--force")
        assert again.returncode == 0, again.stderr
        formats = {b["response_format"]["type"] for b in server.request_bodies[seen:]}
    assert formats == {"json_schema"}
    assert catalog_rows(home, "SELECT json_schema FROM llm_endpoints") == [(True,)]


def _prompt_dir(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / "prompts"
    shutil.copytree(PROMPT_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("name, text, says", [
    ("spatial.j2", "Class: {{ class_name }\nKind: spatial {% if %}", "spatial.j2 line"),
    ("system.j2", "Write {{ n }} phrases about {{ no_such_variable }}.", "no_such_variable"),
    ("frames.toml", "spatial = 'A video of {phrase}.\ntemporal = [", "frames.toml is not valid TOML"),
    ("frames.toml", "spatial = 'A {kind} video of {phrase}.'\ntemporal = 'A video of {phrase}.'", "{class_name}"),
    ("frames.toml", "spatial = 3\ntemporal = 'A video of {phrase}.'", "must be a sentence frame"),
])
def test_a_broken_prompt_dir_is_one_line_exit_2_before_any_request(home: Path, labels: Path, tmp_path: Path,
                                                                    name: str, text: str, says: str) -> None:
    folder = _prompt_dir(tmp_path, name, text)
    with LLMServer() as server:
        r = cli_describe(home, labels, "--base-url", server.base_url, "--kind", "spatial", "--prompt-dir", folder)
        assert server.requests_total == 0
    assert r.returncode == 2
    line = assert_one_line(r.stderr)
    assert says in line and str(folder) in line
    assert catalog_rows(home, "SELECT count(*) FROM descriptions") == [(0,)]


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "-1"), ("--timeout", "inf"),
                                         ("--max-tokens", "0"), ("--concurrency", "0")])
def test_bad_sampling_flags_are_refused(home: Path, labels: Path, flag: str, value: str) -> None:
    with LLMServer() as server:
        r = cli_describe(home, labels, "--base-url", server.base_url, flag, value)
        assert server.requests_total == 0
    assert r.returncode == 2 and flag in assert_one_line(r.stderr)


def test_a_damaged_journal_line_does_not_block_later_runs(home: Path, labels: Path) -> None:
    with LLMServer() as server:
        describe(home, labels, server)
        good = {"attempt_id": "a" * 32, "request_key": "k" * 64, "status": "error", "error": "HTTP 500: x",
                "latency_s": 0.1}
        journal = home / "journal" / "llm-1-deadbeef.jsonl"
        journal.write_bytes(b"\n".join([
            json.dumps(good).encode(), b"5", b"[]", b'{"attempt_id": "b"}',
            json.dumps({**good, "attempt_id": "c" * 32, "latency_s": "slow"}).encode(),
            json.dumps({**good, "attempt_id": "d" * 32, "prompt_tokens": "many"}).encode(),
            b"\xff\xfe garbage", b'{"attempt_id": "e", "request_k']) + b"\n")
        r = cli_describe(home, labels, "--base-url", server.base_url, "--kind", "spatial", "--model", "m",
                         "--force")
    assert r.returncode == 0, r.stderr
    assert "recovered 1 recorded LLM attempts" in r.stdout and "skipped 7 damaged journal lines" in r.stdout
    assert not journal.exists()
    assert catalog_rows(home, f"SELECT count(*) FROM llm_requests WHERE attempt_id = '{'a' * 32}'") == [(1,)]


def test_an_import_whose_lists_are_all_empty_is_refused(home: Path, labels: Path, tmp_path: Path) -> None:
    f = tmp_path / "empty.json"
    f.write_text(json.dumps({str(i): [] for i in range(len(CLASSES))} | {"0": ["", "  "]}))
    r = cli_describe(home, labels, "--from-file", f, "--kind", "spatial")
    assert r.returncode == 2 and str(f) in assert_one_line(r.stderr)
    assert catalog_rows(home, "SELECT count(*) FROM runs WHERE status = 'done' AND stage = 'describe'") == [(0,)]


def test_class_names_that_read_the_same_are_refused(home: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("brush_hair\nclapping\nbrush hair\nBrushHair\n")
    with LLMServer() as server:
        r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--base-url", server.base_url,
                    "--kind", "spatial")
        assert server.requests_total == 0
    line = assert_one_line(r.stderr)
    assert r.returncode == 2
    assert "class ids 0 ('brush_hair'), 2 ('brush hair'), 3 ('BrushHair') all read 'brush hair'" in line


def test_a_failing_kind_does_not_stop_the_other(home: Path, labels: Path) -> None:
    with LLMServer(always_misbehave={"clapping": "wrong_count"}) as server:
        r = cli_describe(home, labels, "--base-url", server.base_url, "--max-reasks", "0")
    assert r.returncode == 1
    line = assert_one_line(r.stderr)
    assert "describe:toy:spatial: 1 of 5 classes" in line and "describe:toy:temporal: 1 of 5 classes" in line
    assert catalog_rows(home, "SELECT kind, count(*) FROM descriptions GROUP BY kind ORDER BY kind") == \
        [("spatial", 8), ("temporal", 8)]
