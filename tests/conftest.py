"""Shared fixtures: a temporary pipeline home, the CLI as a subprocess, the real reference data."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Test models are tiny: on a shared 2-core CPU, thread start-up and spinning cost far more
    than the maths (measured ~100x on the tiny configs)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"the reference data folder {SHARED_DATA} is absent (it exists only beside the project's checkout)")
    return SHARED_DATA


def docs_text() -> str:
    """The README and every page of docs/, where the documented queries and commands live."""
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def readme_query(start: str, dataset: str) -> str:
    """The documented SQL query that begins with `start`, asked of `dataset` instead of SSv2."""
    readme = docs_text()
    query = readme[readme.index(start):]
    return query[: query.index(";")].replace("'ssv2'", f"'{dataset}'")


def catalog_rows(home: Path, sql: str) -> list[tuple]:
    """Rows of a read-only query on a home's catalog (as a user's duckdb shell would see them)."""
    import duckdb

    con = duckdb.connect(str(home / "catalog.duckdb"), read_only=True)
    try:
        con.execute("SET file_search_path = ?", [str(home)])  # the stored views name paths under the home
        return con.execute(sql).fetchall()
    finally:
        con.close()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "MSTA_"))}
    env.update({"MSTA_LOCK_WAIT": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`msta-pipe ARGS` in a fresh interpreter, the way a user runs it."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args), "--no-progress"]
                          if _takes_progress(args) else [sys.executable, "-m", "pipeline", *map(str, args)],
                          capture_output=True, text=True, env=env or cli_env(), cwd=cwd or ROOT, timeout=timeout)


def _takes_progress(args: tuple[str | Path, ...]) -> bool:
    return bool(args) and str(args[0]) in {"describe", "frames", "train", "evaluate", "demo"} and "--help" not in args


def described_toy_home(root: Path, last_text: str = "A video about a crowd.") -> Path:
    """Two classes, both kinds imported from files, embedded with the tiny random CLIP: a real
    text_embeddings view. `last_text` is class 1's second description."""
    import json

    (root / "labels.txt").write_text("waving\nclapping\n")
    (root / "msta.toml").write_text('[datasets.toy]\nlabels = "labels.txt"\n')
    for kind in ("spatial", "temporal"):
        f = root / f"{kind}.json"
        f.write_text(json.dumps({"0": ["A video about a hand.", "A video about an arm."],
                                 "1": ["A video about two hands.", last_text]}))
        r = run_cli("describe", "-d", "toy", "--config", root / "msta.toml", "--from-file", f, "--kind", kind,
                    "--home", root / "home")
        assert r.returncode == 0, r.stderr
    r = run_cli("embed", "-d", "toy", "--config", root / "msta.toml", "--backbone", "msta-tiny",
                "--pretrained", "random", "--device", "cpu", "--home", root / "home")
    assert r.returncode == 0, r.stderr
    return root / "home"


def register_index(con, home: Path, target: str, rows: list[dict]) -> str:
    """A frame index as `frames` publishes one: its Parquet artifact (video, label, entry_key per line),
    registered in `artifacts` and `frame_lists` (dataset toy, list train); its digest."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cache.catalog import insert_rows
    from cache.store import Store
    from cache.views import refresh_frames

    store = Store(home)
    digest = hashlib.sha256(f"{target}{rows}".encode()).hexdigest()
    path = store.artifact_path("frame_index", digest, ".parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("video", pa.string()), ("label", pa.int32()), ("entry_key", pa.string())])
    pq.write_table(pa.Table.from_pylist([{"label": 0, **r} for r in rows], schema=schema), path)
    insert_rows(con, "artifacts", [{"digest": digest, "kind": "frame_index", "path": store.relative(path),
                                    "file_sha256": digest}])
    insert_rows(con, "frame_lists", [{"target": target, "artifact": digest, "dataset": "toy", "list": "train",
                                      "path": store.relative(path)}], "OR REPLACE")
    refresh_frames(con, home)
    return digest
