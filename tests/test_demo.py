"""`msta-pipe demo` end to end on a small recipe: every stage of the pipeline, one table."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.commands.dag import stage_for
from pipeline.commands.demo import DemoRecipe, run_demo
from stages.engine.runner import Runner

from .conftest import catalog_rows


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_the_table(tmp_path: Path) -> None:
    home = tmp_path / "home"
    runner = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
    recipe = DemoRecipe(videos_per_class=16, test_per_class=2, shots=2, epochs=1, batch_size=8)
    table = run_demo(runner, tmp_path / "demo", recipe, lambda s: None)
    lines = table.splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines
            if line.startswith("| ") and not line.startswith("| model")}
    assert set(rows) == {"frozen CLIP (frame mean)", "MSTA w/o L_CC", "MSTA", "MSTA w/o temporal"}
    assert all(cell != "-" for name, cells in rows.items() for cell in cells if name != "MSTA w/o temporal")
    assert rows["MSTA w/o temporal"][2:] == ["-", "-", "-"]
    stages = dict(catalog_rows(home, "SELECT stage, count(*) FROM runs WHERE status = 'done' GROUP BY stage"))
    assert stages["train"] == 5 and stages["describe"] == 4 and stages["embed"] == 2
    # a second demo run finds everything cached
    runner2 = Runner(home, stage_for, {"progress": False}, echo=lambda s: None)
    assert run_demo(runner2, tmp_path / "demo", recipe, lambda s: None) == table
    assert catalog_rows(home, "SELECT count(*) FROM runs WHERE stage = 'train'") == [(5,)]
    # Two seeds: the first seed's runs are reused, the second trains its own; cells become mean ± std,
    # HM the HM of the mean base and mean novel.
    two = run_demo(runner2, tmp_path / "demo", recipe, lambda s: None, seeds=2)
    assert catalog_rows(home, "SELECT count(*) FROM runs WHERE stage = 'train'") == [(10,)]
    msta = next(line for line in two.splitlines() if line.startswith("| MSTA    "))
    cells = [c.strip() for c in msta.split("|")[2:-1]]
    assert all("±" in c for c in cells[:4]) and "±" not in cells[4] and "mean ± std over 2 seeds" in two
    # The report on the demo's home agrees with the demo's table cell for cell (each configuration its
    # own row; seeds aggregated, never two configurations).
    from pipeline.commands.report import render

    report = render(runner2.catalog)
    for name, all_cell, base_cell, novel_cell, hm_cell in [
            (n, *(c.strip() for i, c in enumerate(line.split("|")[2:-1]) if i in (0, 2, 3, 4)))
            for line in two.splitlines() if line.startswith("| MSTA")
            for n in [line.split("|")[1].strip()]]:
        few = next(r for r in report.splitlines() if r.startswith(f"| world | test | {name} #"))
        assert f"| {all_cell} (n=2) |" in few, (few, all_cell)
        if base_cell != "-":
            b2n = next(r for r in report.splitlines() if r.startswith(f"| world | {name} #") and "(n=2)" in r)
            assert b2n.endswith(f"| {base_cell} (n=2) | {novel_cell} (n=2) | {hm_cell} |"), (b2n, base_cell)
    frozen = next(r for r in report.splitlines() if r.startswith("| zero-shot | world | frozen CLIP"))
    assert f"| {rows['frozen CLIP (frame mean)'][0]} (n=1) |" in frozen
