"""A completed training run as the catalog recorded it, for the commands that use a trained model
without re-running anything (`predict`, `export`): its request, its weights artifact and the class
list it trained on, found by their digests. Nothing upstream is re-evaluated, so a run stays
usable after its training videos or description files are gone."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cache.catalog import rows_as_dicts
from cache.errors import UserError
from stages.engine.stage import Artifact, Request


@dataclass(frozen=True)
class TrainedRun:
    key: str
    request: Request
    artifact: Artifact
    classes: list[tuple[int, str, str]]  # (class_id, raw_name, name), as training read them
    inputs: dict[str, str]  # input name -> the digest the run was keyed with
    configuration: str      # e.g. `MSTA w/o L_CC #1f0c9a2e`

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.request.params)

    def describe(self, selection: str | None = None) -> str:
        p = self.request.params
        return run_description(self.key, self.configuration, p["seed"], p["split_seed"], selection)

    @property
    def views(self) -> dict[str, int] | None:
        """The test views of its dataset, as recorded with the run (None: a run from before)."""
        return self.request.locators.get("test_views")


_COLUMNS = "key, target, configuration, request, output, inputs"


def latest_per_target(con: Any, dataset: str, seed: int | None = None) -> list[dict[str, Any]]:
    """The latest completed training run of every target (configuration x seed x split) on `dataset`
    (or its base half), oldest target first; with training seed `seed` when given."""
    return rows_as_dicts(con, f"""
        SELECT {_COLUMNS} FROM runs WHERE stage = 'train' AND status = 'done'
          AND params->>'dataset' IN (?, ?) AND (? IS NULL OR params->>'seed' = ?)
        QUALIFY row_number() OVER (PARTITION BY target ORDER BY finished_at DESC) = 1
        ORDER BY finished_at""", [dataset, f"{dataset}-base", seed, None if seed is None else str(seed)])


def run_row(con: Any, dataset: str | None, run: str | None, seed: int | None = None) -> dict[str, Any]:
    """The `runs` row of the training run with key (prefix) `run`; else the latest completed run on
    `dataset` (or its base half), with training seed `seed` when given, provided every such run is
    of one configuration: "the latest run" of two configurations would pick one silently."""
    if run:
        rows = rows_as_dicts(con, f"SELECT {_COLUMNS} FROM runs WHERE stage = 'train' AND status = 'done' "
                                  "AND key LIKE ? ORDER BY finished_at DESC", [run + "%"])
        if len({r["key"] for r in rows}) > 1:
            raise UserError(f"--run {run} matches {len({r['key'] for r in rows})} runs; give more of the key", 2)
    else:
        rows = latest_per_target(con, dataset or "", seed)  # oldest first
        latest = {_configuration(r): r["key"][:16] for r in rows}  # the latest run of each configuration
        if len(latest) > 1:
            listed = "; ".join(f"{c}: --run {k}" for c, k in sorted(latest.items()))
            raise UserError(f"dataset {dataset!r} has runs of {len(latest)} configurations ({listed}); "
                            "pass --run KEY to say which", 2)
        rows = rows[-1:]
    if not rows:
        where = f"with key {run}" if run else f"on dataset {dataset!r}" + ("" if seed is None else f" with seed {seed}")
        raise UserError(f"no completed training run {where}: train one, pass --run KEY, or use --frozen", 2)
    return rows[0]


def _configuration(row: dict[str, Any]) -> str:
    if row["configuration"]:
        return row["configuration"]
    from stages.train import configuration_name  # a run registered before configurations were recorded

    return configuration_name(json.loads(row["request"])["params"])


def run_description(key: str, configuration: str, seed: Any, split: Any, selection: str | None = None) -> str:
    """Which run a model is, in words: its key, configuration, repeat and weights (how `predict` and
    `export` name the model they used)."""
    return (f"run {key[:16]} ({configuration}, seed {seed}, split {split}"
            + (f", {selection} weights" if selection else "") + ")")


def trained_run(runner: Any, dataset: str | None, run: str | None) -> TrainedRun:
    """The run `run_row` picks, with its weights and class list checked on disk."""
    if not runner.catalog.exists():
        raise UserError(f"no catalog at {runner.catalog.path}: train a run first, or pass the right --home", 2)
    with runner.catalog.reader() as con:
        row = run_row(con, dataset, run)
        digests = json.loads(row["inputs"])
        found = {r["digest"]: r for r in rows_as_dicts(
            con, "SELECT * FROM artifacts WHERE digest IN (?, ?)", [row["output"], digests["classes"]])}
    artifact, classes = (_intact(runner, found.get(d), row["key"]) for d in (row["output"], digests["classes"]))
    from stages.artifacts import read_classes

    return TrainedRun(row["key"], Request.from_json(json.loads(row["request"])), artifact, read_classes(classes),
                      digests, _configuration(row))


def _intact(runner: Any, row: dict[str, Any] | None, key: str) -> Artifact:
    path = runner.store.absolute(row["path"]) if row else None
    if path is None or not runner.store.verify(path, row["file_sha256"]):  # type: ignore[index]
        raise UserError(f"a file of training run {key[:16]} is missing or altered"
                        f"{f' ({path})' if path else ''}; run `msta-pipe train ... --force` again", 1)
    return Artifact(row["digest"], row["kind"], path, json.loads(row["meta"] or "{}"))  # type: ignore[index]
