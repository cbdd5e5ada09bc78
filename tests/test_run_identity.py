"""What a run is, and what the project says about it: one home with MSTA and two ablations, two seeds
each, trained and evaluated through the CLI. The report groups by configuration and never mixes
two; a command that picks a run says which; a key alone finds a run; `gc --superseded` keeps every
configuration; `features` keeps one artifact per run; `params` reads as plain JSON in SQL."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from .conftest import catalog_rows, readme_query, run_cli
from .test_train import TINY, prepared_home, world  # noqa: F401  (the module-scoped world fixture)

pytestmark = pytest.mark.slow

VARIANTS = {"MSTA": [], "MSTA w/o L_CC": ["--no-consistency"], "MSTA w/o temporal": ["--no-temporal"]}
SEEDS = (1, 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, world: Path) -> Path:  # noqa: F811
    home = tmp_path_factory.mktemp("identity") / "home"
    prepared_home(home, world)
    config = world / "msta.toml"
    for flags in VARIANTS.values():
        r = run_cli("train", "-d", "world", "--shots", "2", "--draw-shots", "--epochs", "1", "--seeds",
                    ",".join(map(str, SEEDS)), *TINY, *flags, "--config", config, "--home", home)
        assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("evaluate", "-d", "world", "--selection", "last", "--config", config, "--home", home)
    assert r.returncode == 0, r.stdout + r.stderr
    return home


def train_runs(home: Path) -> list[tuple[str, str, dict]]:
    return [(k, c, json.loads(p)) for k, c, p in
            catalog_rows(home, "SELECT key, configuration, params FROM runs WHERE stage = 'train' AND status = 'done'")]


def test_every_configuration_and_seed_is_its_own_run(trained: Path) -> None:
    runs = train_runs(trained)
    assert len(runs) == len(VARIANTS) * len(SEEDS)
    by_name = {}
    for _, conf, _ in runs:
        name, _, cid = conf.rpartition(" #")
        by_name.setdefault(name, set()).add(cid)
    assert {n: len(ids) for n, ids in by_name.items()} == {n: 1 for n in VARIANTS}  # one id per configuration
    targets = catalog_rows(trained, "SELECT DISTINCT target FROM runs WHERE stage = 'train'")
    assert len(targets) == len(runs)  # no two runs share a target: none replaces another


def test_the_report_groups_by_configuration_and_counts_its_runs(trained: Path) -> None:
    runs = {k: (c, p) for k, c, p in train_runs(trained)}
    top1 = dict(catalog_rows(trained, "SELECT run_key, value FROM results WHERE metric = 'top1' "
                                      "AND selection = 'last' AND dataset = 'world'"))
    assert set(top1) == set(runs)  # evaluate tested every configuration's runs, not the latest one
    report = run_cli("report", "--home", trained).stdout
    rows = [line for line in report.splitlines() if line.startswith("| world | test |")]
    assert len(rows) == len(VARIANTS)
    for conf in {c for c, _ in runs.values()}:
        values = [100 * top1[k] for k, (c, _) in runs.items() if c == conf]
        cell = f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n=2)"
        assert f"| world | test | {conf} | last | {cell} |" in rows, (conf, cell, rows)
    assert "| K=2 |" in report  # the columns come from the data
    assert "## Configurations" in report and "adapter.temporal" in report and "alpha" in report
    csv = run_cli("report", "--format", "csv", "--home", trained).stdout.splitlines()
    assert csv[0] == "run_key,configuration,protocol,dataset,split,metric,value,selection"
    assert {line.split(",")[1] for line in csv[1:] if ",world,test,top1," in line} == {c for c, _ in runs.values()}


def test_a_dataset_with_several_configurations_asks_which_run(trained: Path, world: Path) -> None:  # noqa: F811
    video = next((world / "videos").rglob("*.mp4"))
    r = run_cli("predict", video, "-d", "world", "--home", trained, "--config", world / "msta.toml")
    assert r.returncode == 2 and "3 configurations" in r.stderr and "--run" in r.stderr
    for conf in VARIANTS:
        assert conf + " #" in r.stderr


def test_a_key_alone_finds_a_run_and_every_format_names_it(trained: Path, world: Path) -> None:  # noqa: F811
    key, conf, _ = next(r for r in train_runs(trained) if r[1].startswith("MSTA w/o L_CC"))
    video = next((world / "videos").rglob("*.mp4"))
    table = run_cli("predict", video, "--run", key[:12], "--home", trained, "--no-progress")  # no --config
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].startswith(f"model: {key}:last (run {key[:16]} ({conf}, seed ")
    lines = run_cli("predict", video, "--run", key[:12], "--format", "jsonl", "--home", trained,
                    "--no-progress").stdout.splitlines()
    assert all(json.loads(line)["model"] == f"{key}:last" and conf in json.loads(line)["configuration"]
               for line in lines)
    csv = run_cli("predict", video, "--run", key[:12], "--format", "csv", "--home", trained, "--no-progress").stdout
    assert csv.splitlines()[0].endswith(",model,configuration") and conf in csv.splitlines()[1]
    out = trained.parent / "export"
    exported = run_cli("export", "--run", key[:12], "--out", out, "--home", trained)  # no --config either
    assert exported.returncode == 0, exported.stderr
    assert conf in exported.stdout and json.loads((out / "config.json").read_text())["configuration"] == conf


def test_gc_superseded_keeps_every_configuration(trained: Path) -> None:
    r = run_cli("gc", "--superseded", "--dry-run", "--home", trained)
    assert r.returncode == 0 and "superseded run" not in r.stdout, r.stdout


def test_params_read_as_plain_json_in_sql(trained: Path) -> None:
    r = run_cli("sql", "SELECT configuration, count(*) AS n FROM runs WHERE stage = 'train' "
                       "AND (params->>'alpha')::DOUBLE = 0 GROUP BY 1", "--format", "json", "--home", trained)
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["configuration"].startswith("MSTA w/o L_CC #") and rows[0]["n"] == 2
    lr = catalog_rows(trained, "SELECT DISTINCT params->'lr' FROM runs WHERE stage = 'train'")
    assert lr == [("0.001",)]


def test_features_keep_one_artifact_per_run(trained: Path, world: Path) -> None:  # noqa: F811
    keys = [k for k, c, _ in train_runs(trained) if c.startswith("MSTA w/o temporal")]
    for key in keys:
        r = run_cli("features", "-d", "world", "--list", "test", "--run", key[:12], "--workers", "0",
                    "--config", world / "msta.toml", "--home", trained)
        assert r.returncode == 0, r.stderr
    assert sorted(k for (k,) in catalog_rows(trained, "SELECT DISTINCT run_key FROM video_embeddings")) == sorted(keys)


def test_the_readme_params_query(trained: Path) -> None:
    r = run_cli("sql", readme_query("SELECT configuration, params->>'alpha'", "world"), "--format", "json",
                "--home", trained)
    rows = json.loads(r.stdout)
    assert r.returncode == 0 and [(x["alpha"], x["temporal"], x["runs"]) for x in rows] == [
        ("1.0", "true", 2), ("0.0", "true", 2), ("1.0", "false", 2)]
    assert all(x["seeds"] == ["1", "2"] for x in rows)
