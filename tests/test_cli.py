"""The command line: a light start, complete help, read-only SQL in three formats, status exit
codes, garbage collection, and clear errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, cli_env, run_cli

COMMANDS = ["describe", "embed", "frames", "train", "evaluate", "report", "params", "synth", "status", "sql", "gc",
            "demo", "predict", "export", "features"]


def test_help_imports_nothing_heavy() -> None:
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom pipeline.cli import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "heavy = [m for m in ('torch', 'open_clip', 'duckdb', 'pyarrow', 'decord', 'av', 'openai') if m in sys.modules]\n"
            "print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_complete_help(command: str) -> None:
    r = run_cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "--home" in r.stdout or command in ("params", "synth")
    options = [line for line in r.stdout.splitlines() if line.strip().startswith("--")]
    undocumented = [o for o in options if len(o.split()) < 2 and not o.strip().startswith("--help")]
    assert not undocumented, undocumented


def import_toy(home: Path, tmp_path: Path, keys: tuple[str, str] = ("0", "1")) -> tuple[Path, Path]:
    """Two classes with spatial descriptions imported from a file keyed by class id or by name."""
    labels = tmp_path / "labels.txt"
    labels.write_text("waving\nclapping\n")
    f = tmp_path / "d.json"
    f.write_text(json.dumps({keys[0]: ["A video about a hand.", "A video about an arm."],
                             keys[1]: ["A video about two hands.", "A video about a crowd."]}))
    assert run_cli("describe", "-d", "toy", "--labels", labels, "--from-file", f, "--kind", "spatial",
                   "--home", home).returncode == 0
    return labels, f


def test_sql_is_read_only_and_speaks_three_formats(home: Path, tmp_path: Path) -> None:
    import_toy(home, tmp_path)
    query = "select class_id, phrase from descriptions order by class_id, idx"
    table = run_cli("sql", query, "--home", home)
    assert table.returncode == 0 and "a hand" in table.stdout and "(4 rows)" in table.stdout
    csv = run_cli("sql", query, "--format", "csv", "--home", home)
    assert csv.stdout.splitlines()[:2] == ["class_id,phrase", "0,a hand"]
    rows = json.loads(run_cli("sql", query, "--format", "json", "--home", home).stdout)
    assert rows[-1] == {"class_id": 1, "phrase": "a crowd"}
    for statement in ("delete from descriptions", "drop table runs", "copy runs to 'x.csv'",
                      f"attach '{tmp_path / 'x.db'}'", "select 1; delete from runs"):
        refused = run_cli("sql", statement, "--home", home)
        assert refused.returncode == 2 and "read-only" in refused.stderr, statement
    bad = run_cli("sql", "select nope from descriptions", "--home", home)
    assert bad.returncode == 1 and "query failed" in bad.stderr
    assert run_cli("sql", "select 1", "--home", tmp_path / "nowhere").returncode == 2


def test_status_exits_3_when_stale_and_names_the_reason(home: Path, tmp_path: Path) -> None:
    labels, f = import_toy(home, tmp_path, ("waving", "clapping"))
    ok = run_cli("status", "--home", home)
    assert ok.returncode == 0
    assert states(ok.stdout)["describe:toy:spatial"] == ("fresh", "")
    assert states(ok.stdout)["describe:toy:temporal"] == ("missing", "never run")
    labels.write_text("waving\nclapping\njumping\n")
    stale = run_cli("status", "--home", home)
    assert stale.returncode == 3  # stale, nothing failed
    assert states(stale.stdout)["labels:toy"] == ("stale", "input content: file changed")
    assert states(stale.stdout)["describe:toy:spatial"] == ("stale", "upstream labels:toy is stale")


def states(status_output: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in status_output.splitlines():
        target, state, *reason = line.split(maxsplit=2)
        out[target] = (state, reason[0] if reason else "")
    return out


def test_gc_removes_what_no_row_reaches(home: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("waving\nclapping\n")
    assert run_cli("describe", "-d", "toy", "--labels", labels, "--from-file", labels, "--kind", "spatial",
                   "--home", home).returncode == 2  # not JSON: refused, nothing half-written
    f = tmp_path / "d.json"

    def describe(text: str) -> str:
        f.write_text(json.dumps({"waving": [f"A video about a {text}.", "A video about an arm."],
                                 "clapping": ["A video about two hands.", "A video about a crowd."]}))
        return run_cli("describe", "-d", "toy", "--labels", labels, "--from-file", f, "--kind", "spatial",
                       "--home", home).stdout

    for text in ("hand", "foot"):  # two runs of one target: the first is superseded, not unreachable
        describe(text)
    orphan = home / "artifacts" / "descriptions" / "zz" / ".tmp-left-by-a-crash"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    dry = run_cli("gc", "--dry-run", "--home", home)
    assert "would delete 1 files" in dry.stdout and orphan.exists()
    assert run_cli("gc", "--home", home).returncode == 0 and not orphan.exists()
    assert run_cli("status", "--home", home).returncode == 0  # everything current is intact
    assert "fresh  describe:toy:spatial" in describe("hand")  # the earlier run's artifact survived gc
    describe("foot")
    assert "deleted 0 files" in run_cli("gc", "--home", home).stdout
    dry = run_cli("gc", "--superseded", "--dry-run", "--home", home)  # the explicit scope names what goes
    assert "would delete superseded run" in dry.stdout and "of describe:toy:spatial" in dry.stdout
    assert "would delete 1 files" in dry.stdout
    assert run_cli("gc", "--superseded", "--home", home).returncode == 0
    assert "run    describe:toy:spatial" in describe("hand")


def test_unknown_dataset_and_malformed_config_are_clear(home: Path, tmp_path: Path) -> None:
    r = run_cli("embed", "-d", "nope", "--home", home)
    assert r.returncode == 2 and "unknown dataset 'nope'" in r.stderr
    cfg = tmp_path / "msta.toml"
    cfg.write_text("[datasets.x\nlabels=1")
    r = run_cli("embed", "-d", "x", "--config", cfg, "--home", home)
    assert r.returncode == 2 and "not valid TOML" in r.stderr and str(cfg) in r.stderr
    r = run_cli("frames", "-d", "ssv2", "--list", "train", "--home", home)
    assert r.returncode == 2 and "no class list configured" in r.stderr
    for odd in ("a,b", "h[1]"):  # DuckDB would split the first after the work, read the second as h1
        r = run_cli("status", "--home", tmp_path / odd)
        assert r.returncode == 2 and "has one of , * ? [ in its path" in r.stderr and not (tmp_path / odd).exists()


def test_pretrain_stage_writes_weights_and_caches_them(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    args = ["train", "--stage", "pretrain", "--backbone", "msta-tiny", "--steps", "2", "--batch-size", "8",
            "--seed", "0", "--home", home]
    r = run_cli(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "retrieval_top1" in r.stdout and out.stat().st_size > 0
    from msta.method.backbone import load_backbone

    assert load_backbone("msta-tiny", str(out)).identity.weights_digest != "random-init:seed0"
    again = run_cli(*args)
    assert "fresh  pretrain:msta-tiny" in again.stdout


def test_status_tells_failed_from_stale_and_a_failure_can_be_cleared(home: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("waving\nclapping\n")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"0": ["A video about a hand.", "A video about an arm."]}))  # class 1 missing
    args = ["describe", "-d", "toy", "--labels", labels, "--kind", "spatial", "--home", home]
    assert run_cli(*args, "--from-file", partial).returncode == 1
    failed = run_cli("status", "--home", home)
    assert failed.returncode == 1 and states(failed.stdout)["describe:toy:spatial"][0] == "failed"
    # cleared by an explicit command: listed, kept as history, no longer reported
    dry = run_cli("gc", "--failed", "--dry-run", "--home", home)
    assert "would clear failed run" in dry.stdout and run_cli("status", "--home", home).returncode == 1
    assert "cleared failed run" in run_cli("gc", "--failed", "--home", home).stdout
    assert run_cli("status", "--home", home).returncode == 0
    assert run_cli("sql", "select status from runs where stage = 'describe'", "--format", "csv",
                   "--home", home).stdout.split() == ["status", "cleared"]
    # or by its next success
    assert run_cli(*args, "--from-file", partial).returncode == 1
    assert run_cli("status", "--home", home).returncode == 1
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps({"0": ["A video about a hand.", "A video about an arm."],
                                 "1": ["A video about two hands.", "A video about a crowd."]}))
    assert run_cli(*args, "--from-file", whole).returncode == 0
    assert run_cli("status", "--home", home).returncode == 0
