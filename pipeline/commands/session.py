"""What every command shares: the home, its config, a runner, the writer lock, materialising requests
(in one process or as one rank of a torchrun launch), resolving backbones and devices, and printing
rows. Heavy modules are imported inside the functions that need them."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from cache.errors import UserError, printable, scrub


def home_dir(home: Path | None) -> Path:
    path = (home or Path(os.environ.get("MSTA_HOME", ".msta"))).resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"the home {path} (--home / MSTA_HOME) is a file, not a folder", 2)
    # DuckDB reads the home's Parquet files by path: its file_search_path is a comma list, and a path
    # with * ? [ is a pattern (h[1] would read h1)
    if any(c in str(path) for c in ",*?["):
        raise UserError(f"the home {path} (--home / MSTA_HOME) has one of , * ? [ in its path, which DuckDB reads "
                        "as a list or a pattern: choose a folder without them", 2)
    return path


def load_config(config: Path | None) -> Any:
    from stages.formats.datasets import Config

    if config is None and Path("msta.toml").exists():
        config = Path("msta.toml")
    return Config(config)


def make_runner(home: Path | None, **options: Any) -> Any:
    from pipeline.commands.dag import stage_for
    from stages.engine.runner import Runner

    return Runner(home_dir(home), stage_for, options, echo=lambda s: typer.echo(scrub(s), err=False))


def writing(home: Path | None) -> Any:
    """The home's writer lock for commands that change it (see cache/lock.py)."""
    from cache.lock import HomeLock

    return HomeLock(home_dir(home))


def materialise(runner: Any, home: Path | None, requests: list[Any], force: bool, dry_run: bool) -> list[Any]:
    if dry_run:
        return [runner.materialise(r, force=force, dry_run=True) for r in requests]
    with writing(home):
        return [runner.materialise(r, force=force) for r in requests]


def backbone_pair(backbone: str | None, pretrained: str | None) -> tuple[str, str | None]:
    """The one spelling of --backbone/--pretrained that keys and loading use."""
    from pipeline.commands.configs import canonical_backbone

    name, weights = canonical_backbone(backbone, pretrained)
    return name, weights or None


def seed_list(seeds: str | None, seed: int) -> list[int]:
    if seeds is None:
        return [seed]
    try:
        values = [int(v) for v in seeds.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 2048,1,2", 2) from None
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise UserError(f"--seeds {seeds!r}: give distinct non-negative integers", 2)
    return values


def launched() -> bool:
    """Whether this process is one rank of a torchrun launch of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_materialise(runner: Any, home: Path | None, req: Any, force: bool, dry_run: bool) -> Any:
    """Single process, or one rank of a torchrun launch: rank 0 runs upstream stages and registers
    the result; the other ranks wait, then work alongside it without touching the catalog, and
    get None (rank 0 alone reports)."""
    if not launched() or dry_run:
        return materialise(runner, home, [req], force, dry_run)[0]
    from msta.method.runtime import barrier, init_distributed

    rank, _, _ = init_distributed()
    if rank == 0:
        with writing(home):
            for inp in req.inputs.values():
                if hasattr(inp, "stage"):
                    runner.materialise(inp)
    barrier()
    if rank == 0:
        with writing(home):
            art = runner.materialise(req, force=force)
    else:
        runner.follow(req, force=force)
        art = None
    barrier()
    return art


def print_rows(names: list[str], rows: list[tuple[Any, ...]], fmt: str) -> None:
    """Rows as a table, CSV or JSON. Text from the catalog may come from an LLM or a received home:
    secrets are masked in every format, control characters escaped (JSON escapes them itself)."""
    import json

    rows = [tuple(scrub(v) if isinstance(v, str) else v for v in r) for r in rows]
    if fmt == "json":
        typer.echo(json.dumps([dict(zip(names, r)) for r in rows], default=str, indent=1))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow([printable(n) for n in names])
        w.writerows([printable(v) if isinstance(v, str) else v for v in r] for r in rows)
    else:
        cells = [[_cell(v) for v in r] for r in rows]
        names = [printable(n) for n in names]
        widths = [min(60, max([len(n)] + [len(c[i]) for c in cells])) for i, n in enumerate(names)]
        typer.echo("  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip())
        typer.echo("  ".join("-" * w for w in widths))
        for c in cells:
            typer.echo("  ".join(v[:w].ljust(w) for v, w in zip(c, widths)).rstrip())
        typer.echo(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "NULL" if v is None else printable(str(v).replace("\n", " "))


def progress(items: list[Any], desc: str, unit: str) -> Any:
    """A bar on a terminal for work over many items (nothing when output is piped)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False, disable=not sys.stderr.isatty() or len(items) < 50)


def torch_device(device: str) -> Any:
    from msta.method.runtime import resolve_device

    try:
        return resolve_device(device)
    except ValueError as exc:  # an unknown name, or CUDA asked for where there is none
        raise UserError(str(exc), 2) from None

