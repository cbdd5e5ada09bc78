"""`msta-pipe describe` against a real OpenAI-compatible server on 127.0.0.1 (the real `openai`
client over real sockets) that misbehaves like real endpoints, and the importer on real files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache.errors import UserError
from pipeline.commands.configs import DescribeOptions
from pipeline.commands.dag import describe_import_request, describe_llm_request, stage_for
from stages.engine.runner import Runner
from stages.formats.datasets import Config
from prompts.answers import clean_phrase, parse_answer, validate_phrases
from tests.llm_server import MISBEHAVIOURS, LLMServer

from .conftest import ROOT, catalog_rows, cli_env, run_cli

CLASSES = ["waving a hand", "clapping", "jumping over a fence", "tying shoelaces", "pouring water into a glass"]


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    p = tmp_path / "labels.csv"
    p.write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(CLASSES)))
    return p


def describe(home: Path, labels: Path, server: LLMServer, kind: str = "spatial", n: int = 2, force: bool = False,
             **kw) -> Runner:
    runner = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
    ds = Config(None).dataset("toy", labels)
    opts = DescribeOptions(model="m", base_url=server.base_url, n=n, concurrency=4, **kw)
    runner.materialise(describe_llm_request(runner, ds, kind, opts), force=force)
    return runner



def test_answer_parsing_and_validation_rules() -> None:
    count = lambda texts: [len(t.split()) + 2 for t in texts]
    frame = "A video about {phrase}."
    assert parse_answer('```json\n{"descriptions": ["a", "b"]}\n```', 2) == (["a", "b"], [])
    assert parse_answer("Sure! Here you go", 2)[1][0].startswith("the answer is not JSON")
    assert "not a string" in parse_answer('{"descriptions": [{"d": 1}, "b"]}', 2)[1][0]
    assert clean_phrase('1. "A red ball on a table."') == ("a red ball on a table", ["numbering stripped"])
    assert clean_phrase("(lifting the cup)") == ("lifting the cup", ["parentheses stripped"])
    v = validate_phrases(["a ball", "a ball"], 3, "kicking", frame, count, 77)
    assert "expected exactly 3 phrases, got 2" in v.fatal and "phrases 1 and 2 are the same" in v.fatal
    assert "only repeats the class name" in validate_phrases(["Kicking", "x"], 2, "kicking", frame, count, 77).fatal[0]
    long = validate_phrases(["word " * 80, "ok"], 2, "kicking", frame, count, 77)
    assert "over the 77-token context" in long.fatal[0]
    good = validate_phrases(["a ball on grass", "a goal post"], 2, "kicking", frame, count, 77)
    assert good.ok and good.descriptions[0].text == "A video about a ball on grass."


def test_misbehaving_server_still_yields_every_description_and_a_rerun_sends_nothing(home: Path, labels: Path) -> None:
    with LLMServer(misbehave_fraction=0.6, seed=3) as server:
        for kind in ("spatial", "temporal"):
            describe(home, labels, server, kind)
        stats = server.stats()
        assert stats["misbehaved"] > 0
        sent = server.requests_total
        for kind in ("spatial", "temporal"):
            describe(home, labels, server, kind)
        assert server.requests_total == sent  # all cached
        # no (class, kind) was asked again once a valid answer had arrived
        assert all(s["after_accepted"] == 0 for kinds in stats["by_class"].values() for s in kinds.values())
    assert catalog_rows(home, "SELECT count(*), count(DISTINCT (class_id, kind, idx)) FROM descriptions") == [(20, 20)]
    texts = [t for (t,) in catalog_rows(home, "SELECT text FROM descriptions WHERE kind = 'temporal'")]
    assert all(t.startswith("A video of ") and t.endswith(", which is a sub-step.") for t in texts)
    assert all(not p.startswith(("1.", "-", '"')) for (p,) in catalog_rows(home, "SELECT phrase FROM descriptions"))


@pytest.mark.parametrize("misbehaviour", MISBEHAVIOURS)
def test_each_misbehaviour_is_survived(home: Path, labels: Path, misbehaviour: str) -> None:
    with LLMServer(misbehave_fraction=1.0, misbehaviours=[misbehaviour]) as server:
        describe(home, labels, server)
        sent = server.requests_total
        describe(home, labels, server, force=True)  # replays every exchange, re-asks included, from the cache
        assert server.requests_total == sent
    assert catalog_rows(home, "SELECT count(*) FROM descriptions") == [(10,)]
    errors = catalog_rows(home, "SELECT count(*) FROM llm_requests WHERE status = 'error'")[0][0]
    assert errors == (5 if misbehaviour in ("429", "500") else 0)
    if misbehaviour not in ("429", "500", "bullets"):  # invalid answers were answered back
        reasks = catalog_rows(home, "SELECT count(*) FROM llm_requests WHERE json_array_length(messages) = 4")[0][0]
        assert reasks == 5


def test_a_class_that_never_gets_a_valid_answer_fails_alone(home: Path, labels: Path) -> None:
    with LLMServer(always_misbehave={"clapping": "wrong_count"}) as server:
        with pytest.raises(UserError) as err:
            describe(home, labels, server, max_reasks=1)
        assert err.value.exit_code == 1 and "1 of 5 classes" in str(err.value)
        asked = server.stats()["by_class"]["clapping"]["spatial"]["requests"]
        assert asked == 2  # first answer + one re-ask (--max-reasks 1)
    assert catalog_rows(home, "SELECT count(*) FROM descriptions") == [(8,)]
    assert catalog_rows(home, "SELECT class_name, reason FROM description_failures")[0][1].startswith("expected exactly 2")
    assert catalog_rows(home, "SELECT status FROM runs WHERE stage = 'describe'") == [("failed",)]


def test_json_schema_refusal_falls_back_once_and_is_remembered(home: Path, labels: Path) -> None:
    with LLMServer(reject_json_schema=True) as server:
        describe(home, labels, server)
        assert server.stats()["json_schema_rejected"] == 1  # its 500 names response_format: a clear refusal
        describe(home, labels, server, kind="temporal")
        assert server.stats()["json_schema_rejected"] == 1  # remembered for this endpoint and model
        formats = {b.get("response_format", {}).get("type") for b in server.request_bodies[1:]}
    assert formats == {"json_object"}
    assert catalog_rows(home, "SELECT json_schema FROM llm_endpoints") == [(False,)]


def test_cli_needs_an_endpoint_or_key_and_never_leaks_the_key(home: Path, labels: Path) -> None:
    r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home)
    assert r.returncode == 2 and "OPENAI_API_KEY" in r.stderr and "--base-url" in r.stderr
    secret = "sk-test-very-secret-0123456789"
    with LLMServer(require_api_key=secret) as server:
        bad = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--base-url", server.base_url,
                      "--kind", "spatial", env=cli_env(OPENAI_API_KEY="sk-wrong-key-98765"))
        assert bad.returncode == 1 and "401" in bad.stdout + bad.stderr and "sk-wrong" not in bad.stdout + bad.stderr
        ok = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--base-url", server.base_url,
                     env=cli_env(OPENAI_API_KEY=secret))
        assert ok.returncode == 0, ok.stderr
    assert secret not in ok.stdout + ok.stderr
    for path in home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
            assert b"sk-wrong-key" not in path.read_bytes(), path


def test_dry_run_counts_requests_and_sends_none(home: Path, labels: Path) -> None:
    with LLMServer() as server:
        r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--base-url", server.base_url,
                    "--dry-run")
        assert r.returncode == 0 and server.requests_total == 0
        assert r.stdout.count("5 requests would be sent") == 2
        describe(home, labels, server)
        r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--base-url", server.base_url,
                    "--model", "m", "--kind", "spatial", "--concurrency", "4", "--dry-run")
        assert "fresh  describe:toy:spatial" in r.stdout


def test_import_reports_the_real_files_defects(home: Path, shared_data: Path) -> None:
    runner = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
    k400 = Config(None).dataset("k400", shared_data / "labels" / "kinetics_400_labels.csv")
    with pytest.raises(UserError) as err:
        runner.materialise(describe_import_request(
            runner, k400, "spatial", shared_data / "msta_descriptions" / "8_s_description_k400.json", None))
    assert "1 of 400 classes" in str(err.value)
    ((cid, reason),) = catalog_rows(home, "SELECT class_id, reason FROM description_failures")
    assert cid == 174 and "found 1" in reason and "8 sentences run together" in reason
    assert catalog_rows(home, "SELECT count(*) FROM descriptions WHERE class_id = 174") == [(0,)]
    ucf = Config(None).dataset("ucf101", shared_data / "labels" / "ucf_101_labels.csv")
    runner.materialise(describe_import_request(
        runner, ucf, "temporal", shared_data / "msta_descriptions" / "2_t_description_ucf_101.json", None))
    probs = [p for (ps,) in catalog_rows(home, "SELECT problems FROM descriptions WHERE dataset = 'ucf101'") for p in ps]
    assert sum(p == "typo 'A videos'" for p in probs) == 64
    assert any("squashed as 'applyeyemakeup'" in p for p in probs)
    # the text is kept as written; the problems say what is wrong with it
    assert catalog_rows(home, "SELECT text FROM descriptions WHERE dataset='ucf101' AND class_id=0 AND idx=0")[0][0].startswith("A videos of")


def test_import_by_class_name_cupl_format(home: Path, labels: Path, tmp_path: Path) -> None:
    f = tmp_path / "cupl.json"
    f.write_text(json.dumps({n.title(): [f"A video about {n} one.", f"A video about {n} two."] for n in CLASSES}))
    r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--from-file", f, "--kind", "spatial")
    assert r.returncode == 0, r.stderr
    assert catalog_rows(home, "SELECT count(*), sum(len(problems)) FROM descriptions") == [(10, 0)]
    r = run_cli("describe", "-d", "toy", "--labels", labels, "--home", home, "--from-file", f)
    assert r.returncode == 2 and "--kind spatial or --kind temporal" in r.stderr


def journaled_attempts(home: Path) -> dict[tuple[str, str], int]:
    """(class name, kind) -> attempts a killed describe kept: its journal plus what reached the catalog."""
    rows = catalog_rows(home, "SELECT attempt_id, class_name, kind FROM llm_requests")
    for path in (home / "journal").glob("llm-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.append((row["attempt_id"], row["class_name"], row["kind"]))
    counts: dict[tuple[str, str], int] = {}
    for _, name, kind in set(rows):
        counts[(name, kind)] = counts.get((name, kind), 0) + 1
    return counts


@pytest.mark.slow
def test_ssv2_done_when_and_kill_9_resume(home: Path, shared_data: Path, tmp_path: Path) -> None:
    """The issue's "done when": 174 SSv2 classes x 2 kinds against a server that misbehaves on a fifth
    of first attempts -> 696 valid rows, exit 0; the same command again sends 0 requests; kill -9 in
    the middle and rerun -> the same 696 rows, no duplicates, no class asked again once answered."""
    stats_file = tmp_path / "stats.json"
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llm_server.py"), "--latency", "0.05",
                               "--misbehave-fraction", "0.2", "--idle-timeout", "120", "--stats-file", str(stats_file)],
                              stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        args = [sys.executable, "-m", "pipeline", "describe", "--dataset", "ssv2", "--labels",
                str(shared_data / "labels" / "ssv2_labels.csv"), "--base-url", url, "--model", "M", "--home",
                str(home), "--no-progress", "--concurrency", "4"]
        victim = subprocess.Popen(args, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill once a good part of the requests has been answered
            if stats_file.exists() and json.loads(stats_file.read_text())["requests_total"] > 150:
                break
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        time.sleep(0.5)  # let the server finish (or drop) the answers that were in flight
        at_kill = json.loads(stats_file.read_text())
        assert 150 < at_kill["requests_total"] < 400
        kept = journaled_attempts(home)
        # An answer the server sent while the client died never reached the client's journal: asking
        # it again is the only correct move. Those are the requests in flight, at most --concurrency.
        in_flight = {(c, k) for c, kinds in at_kill["by_class"].items() for k, s in kinds.items()
                     if s["requests"] > kept.get((c, k), 0)}
        assert len(in_flight) <= 4
        first = subprocess.run(args, env=cli_env(), cwd=ROOT, capture_output=True, text=True)
        assert first.returncode == 0, first.stdout + first.stderr
        stats = json.loads(stats_file.read_text())
        asked_again = {(c, k) for c, kinds in stats["by_class"].items() for k, s in kinds.items() if s["after_accepted"]}
        assert asked_again <= in_flight
        again = subprocess.run(args, env=cli_env(), cwd=ROOT, capture_output=True, text=True)
        assert again.returncode == 0 and json.loads(stats_file.read_text())["requests_total"] == stats["requests_total"]
    finally:
        server.stdin.close()
        server.wait(timeout=10)
    assert catalog_rows(home, "SELECT kind, count(*) FROM descriptions WHERE dataset='ssv2' GROUP BY kind ORDER BY kind") == \
        [("spatial", 348), ("temporal", 348)]
    assert catalog_rows(home, "SELECT count(*) FROM (SELECT DISTINCT class_id, kind, idx FROM descriptions)") == [(696,)]
    sql = run_cli("sql", "select kind, count(*) from descriptions where dataset='ssv2' group by kind order by kind",
                  "--home", home, "--format", "csv")
    assert sql.stdout.splitlines()[1:] == ["spatial,348", "temporal,348"]
