"""`msta-pipe sql` is read-only for real: DuckDB itself refuses every file, network, extension and
settings access, whatever statement wraps it, while the README's queries over the Parquet-backed
`text_embeddings` view keep working."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from .conftest import described_toy_home, run_cli

README_QUERY = """SELECT a.class_name, b.class_name, array_cosine_similarity(a.embedding, b.embedding) AS sim
FROM text_embeddings a JOIN text_embeddings b
  ON a.dataset = b.dataset AND a.backbone = b.backbone AND a.kind = b.kind AND a.class_id < b.class_id
WHERE a.dataset = 'toy' AND a.kind = 'temporal' AND a.level = 'class'
ORDER BY sim DESC LIMIT 5;"""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return described_toy_home(tmp_path_factory.mktemp("sqlhome"))


def test_readme_query_over_text_embeddings_still_works(home: Path) -> None:
    r = run_cli("sql", README_QUERY, "--home", home, "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and all(-1.0 <= row["sim"] <= 1.0001 for row in rows)
    dims = run_cli("sql", "select distinct len(embedding) as d from text_embeddings", "--home", home, "--format", "csv")
    assert dims.stdout.splitlines() == ["d", "32"]


def _evil_import_dir(tmp_path: Path, out: Path) -> Path:
    """What IMPORT DATABASE runs: a schema.sql whose COPY writes a file."""
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "schema.sql").write_text(f"COPY (SELECT 42 AS pwned) TO '{out / 'imported.csv'}';\n")
    (evil / "load.sql").write_text("")
    return evil


HOSTILE = {
    "explain_analyze_copy": "EXPLAIN ANALYZE COPY (SELECT * FROM runs) TO '{out}/runs.csv'",
    "explain_analyze_copy_into_artifacts": "EXPLAIN ANALYZE COPY (SELECT 1) TO '{artifacts}/descriptions/x.parquet'",
    "import_database": "IMPORT DATABASE '{evil}'",
    "pragma_import_database": "PRAGMA import_database('{evil}')",
    "explain_analyze_install": "EXPLAIN ANALYZE INSTALL httpfs",
    "sqlite_scan_autoload": "SELECT * FROM sqlite_scan('{out}/x.db', 't')",
    "read_csv_passwd": "SELECT * FROM read_csv('/etc/passwd')",
    "read_text": "SELECT * FROM read_text('/etc/hostname')",
    "glob": "SELECT * FROM glob('/etc/*')",
    "profiling_output": "PRAGMA profiling_output='{out}/profile.json'; PRAGMA enable_profiling='json'; SELECT 1",
    "set_external_access": "SET enable_external_access=true",
    "attach": "ATTACH '{out}/other.db'",
    "load": "LOAD httpfs",
    "install": "INSTALL httpfs",
    "copy": "COPY runs TO '{out}/runs.csv'",
    "export": "EXPORT DATABASE '{out}/export'",
    "call_pragma": "CALL enable_logging()",
}


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_statement_is_refused_in_one_line_and_writes_nothing(home: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    query = HOSTILE[name].format(out=out, artifacts=home / "artifacts", evil=_evil_import_dir(tmp_path, out))
    before = _tree(home)
    r = run_cli("sql", query, "--home", home)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "read-only" in lines[0] or "reads the catalog only" in lines[0]
    assert list(out.iterdir()) == []  # nothing written, nothing fetched
    assert _tree(home) == before
