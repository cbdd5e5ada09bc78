"""Named presets of `train` options (`--recipe NAME`): values by TrainOptions field that fill only
what the user did not give on the command line (see options.resolve)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cache.errors import UserError

RECIPES = ("authors", "demo")


def preset(name: str, given: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """The preset's values for the protocol and dataset the user gave."""
    protocol = given.get("protocol", "few-shot")
    if name == "authors":
        from pipeline.commands.authors import authors_recipe

        dataset = given.get("dataset")
        if not dataset:
            raise UserError("--recipe authors needs --dataset: the logged recipe depends on it", 2)
        ds = config.dataset(dataset)
        if ds.paper is None:
            raise UserError(f"--recipe authors cannot place dataset {dataset!r} among the paper's datasets: declare "
                            f"`paper = \"ucf101\"` (hmdb51, ucf101, ssv2, k400, k600) under [datasets.{dataset}] "
                            f"in {ds.source}, or drop --recipe", 2)
        values = authors_recipe(protocol, ds.paper)
        if "backbone" not in given and "pretrained" not in given:  # ViCLIP has no tag to fall back to
            raise UserError(f"--recipe authors trains {values['backbone']} (MODEL.ARCH in every log): pass "
                            "--pretrained PATH to InternVid's ViCLIP-B-16 checkpoint (or --pretrained random), "
                            "or --backbone NAME to train another backbone", 2)
        return values
    if name == "demo":
        from pipeline.commands.demo import demo_options

        return demo_options(protocol)
    raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, not {name!r}", 2)
