"""`evaluate` and `features` over a torchrun launch: two gloo processes on the CPU, each taking every
other video, write the same results, predictions and embeddings as one process does."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import ROOT, catalog_rows, cli_env, run_cli

pytestmark = pytest.mark.slow

FROZEN = ["-d", "world", "--frozen", "--backbone", "msta-world", "--pretrained", "synthetic-world", "--device", "cpu",
          "--workers", "0"]
ARGS = ["evaluate", *FROZEN]
FEATURES = ["features", "--list", "test", *FROZEN]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from msta.world.generate import write_dataset

    return write_dataset(tmp_path_factory.mktemp("world") / "world", 2, 3, seed=0)  # 36 test videos: uneven shards


def launch(world: Path, home: Path, processes: int, args: list[str] = ARGS) -> list[subprocess.CompletedProcess[str]]:
    """A command as torchrun starts it: one interpreter per rank, a gloo group on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(processes):
        env = cli_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", MSTA_LOCK_WAIT="30")
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--config", str(world / "msta.toml"),
                                       "--home", str(home), "--no-progress"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def results(home: Path) -> list[tuple]:
    return catalog_rows(home, "SELECT dataset, split, metric, value, views, selection FROM results ORDER BY metric")


def artifact(home: Path, kind: str) -> dict[str, list]:
    (path,) = [r[0] for r in catalog_rows(home, f"SELECT path FROM artifacts WHERE kind = '{kind}'")]
    return pq.read_table(home / path).to_pydict()


def test_two_processes_write_what_one_writes(world: Path, tmp_path: Path) -> None:
    one = run_cli(*ARGS, "--config", world / "msta.toml", "--home", tmp_path / "one", timeout=600)
    assert one.returncode == 0, one.stderr
    ranks = launch(world, tmp_path / "two", 2)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-2000:] for r in ranks]
    assert "top1" in ranks[0].stdout and "top1" not in ranks[1].stdout  # rank 0 alone reports
    assert results(tmp_path / "two") == results(tmp_path / "one")
    a, b = artifact(tmp_path / "one", "predictions"), artifact(tmp_path / "two", "predictions")
    assert len(a["video"]) == 36 and a["video"] == b["video"]  # every video once, in list order
    assert a["pred"] == b["pred"] and a["top5"] == b["top5"] and a["label"] == b["label"]
    assert max(abs(x - y) for u, v in zip(a["embedding"], b["embedding"]) for x, y in zip(u, v)) < 1e-5
    assert max(abs(x - y) for x, y in zip(a["true_score"], b["true_score"])) < 1e-5
    assert catalog_rows(tmp_path / "two", "SELECT count(*) FROM runs WHERE stage = 'evaluate'") == [(1,)]


def test_features_of_two_processes_are_those_of_one(world: Path, tmp_path: Path) -> None:
    one = run_cli(*FEATURES, "--config", world / "msta.toml", "--home", tmp_path / "one", timeout=600)
    assert one.returncode == 0, one.stderr
    ranks = launch(world, tmp_path / "two", 2, FEATURES)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-2000:] for r in ranks]
    assert "video embeddings:" in ranks[0].stdout and "video embeddings:" not in ranks[1].stdout
    a, b = artifact(tmp_path / "one", "video_embeddings"), artifact(tmp_path / "two", "video_embeddings")
    def keys(t: dict[str, list]) -> list[tuple]:
        return list(zip(t["video"], t["level"], t["view"], t["label"]))

    assert len(set(a["video"])) == 36 and keys(a) == keys(b)  # every video once, its views, in list order
    assert max(abs(x - y) for u, v in zip(a["embedding"], b["embedding"]) for x, y in zip(u, v)) < 1e-5
    assert catalog_rows(tmp_path / "two", "SELECT count(*) FROM video_embeddings WHERE level = 'video'") == [(36,)]


def test_test_max_is_refused_under_a_launch(world: Path, tmp_path: Path) -> None:
    env = cli_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    r = run_cli("evaluate", "-d", "world", "--selection", "test-max", "--config", world / "msta.toml",
                "--home", tmp_path, env=env)
    assert r.returncode == 2 and "one process" in r.stderr and "Traceback" not in r.stderr
