"""labels: a dataset's class list file -> a `classes` artifact (class_id, raw_name, name)."""
from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from cache.catalog import insert_rows
from stages.engine.stage import Artifact, Context, Output, Request, Resolved, Stage, path_of
from stages.formats.classlists import read_class_list


class LabelsStage(Stage):
    code_version = "1"

    def target(self, req: Request, upstream: Mapping[str, str]) -> str:
        return f"labels:{req.params['dataset']}"

    def run(self, req: Request, inputs: Mapping[str, Resolved], ctx: Context) -> Output:
        source = path_of(inputs["file"])
        classes = read_class_list(source)
        table = pa.table({
            "class_id": pa.array([c.class_id for c in classes], pa.int32()),
            "raw_name": [c.raw_name for c in classes],
            "name": [c.name for c in classes],
        })
        dataset = req.params["dataset"]

        def publish(con, artifact: Artifact) -> None:
            con.execute("DELETE FROM classes WHERE dataset = ?", [dataset])
            insert_rows(con, "classes", [{"dataset": dataset, "class_id": c.class_id, "raw_name": c.raw_name,
                                          "name": c.name} for c in classes])

        ctx.echo(f"       {len(classes)} classes from {source}")
        return Output(kind="classes", table=table, publish=publish,
                      summary={"classes": len(classes), "source": str(source)})

    def plan(self, req: Request, inputs: Mapping[str, Resolved] | None, ctx: Context) -> str:
        return f"read the class list {req.inputs['file'].path}"  # type: ignore[union-attr]
