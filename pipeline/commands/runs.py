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
from pipeline.engine.stage import Artifact, Request


@dataclass(frozen=True)
class TrainedRun:
    key: str
    request: Request
    artifact: Artifact
    classes: list[tuple[int, str, str]]  # (class_id, raw_name, name), as training read them
    inputs: dict[str, str]  # input name -> the digest the run was keyed with

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.request.params)


def run_row(con: Any, dataset: str | None, run: str | None, seed: int | None = None) -> dict[str, Any]:
    """The `runs` row of the training run with key (prefix) `run`, else of the latest completed one on
    `dataset` (or its base half), with training seed `seed` when given."""
    if run:
        rows = rows_as_dicts(con, "SELECT key, request, output, inputs FROM runs WHERE stage = 'train' AND "
                                  "status = 'done' AND key LIKE ? ORDER BY finished_at DESC", [run + "%"])
        if len({r["key"] for r in rows}) > 1:
            raise UserError(f"--run {run} matches {len({r['key'] for r in rows})} runs; give more of the key", 2)
    else:
        rows = rows_as_dicts(con, """SELECT key, request, output, inputs FROM runs WHERE stage = 'train'
                                     AND status = 'done' AND params->>'dataset' IN (?, ?)
                                     AND (? IS NULL OR params->>'seed' = ?)
                                     ORDER BY finished_at DESC LIMIT 1""",
                             [dataset, f"{dataset}-base", seed, None if seed is None else str(seed)])
    if not rows:
        where = f"with key {run}" if run else f"on dataset {dataset!r}" + ("" if seed is None else f" with seed {seed}")
        raise UserError(f"no completed training run {where}: train one, pass --run KEY, or use --frozen", 2)
    return rows[0]


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
                      digests)


def _intact(runner: Any, row: dict[str, Any] | None, key: str) -> Artifact:
    path = runner.store.absolute(row["path"]) if row else None
    if path is None or not runner.store.verify(path, row["file_sha256"]):  # type: ignore[index]
        raise UserError(f"a file of training run {key[:16]} is missing or altered"
                        f"{f' ({path})' if path else ''}; run `msta-pipe train ... --force` again", 1)
    return Artifact(row["digest"], row["kind"], path, json.loads(row["meta"] or "{}"))  # type: ignore[index]
