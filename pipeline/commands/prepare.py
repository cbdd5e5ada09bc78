"""The commands that prepare what training reads: `describe` (LLM or file), `embed` (the frozen text
tower) and `frames` (decode and sample once)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cache.errors import UserError
from pipeline.commands import session
from pipeline.commands.configs import DescribeOptions, FramesOptions, environment_defaults
from pipeline.commands.options import resolve


def describe_command(given: dict[str, Any], force: bool, dry_run: bool, no_progress: bool, home: Path | None,
                     config: Path | None) -> None:
    from pipeline.commands.dag import describe_import_request, describe_llm_request

    o = resolve(DescribeOptions, given, environment_defaults())
    o.check()
    runner = session.make_runner(home, progress=not no_progress)
    ds = session.load_config(config).dataset(o.dataset, Path(o.labels) if o.labels else None)
    if o.from_file is not None:
        requests = [describe_import_request(runner, ds, o.kind, Path(o.from_file), o.n, o.prompt_folder)]
    else:
        requests = [describe_llm_request(runner, ds, k, o) for k in o.kinds]
        if not dry_run:
            from prompts.llm import resolve_api_key

            resolve_api_key(o.base_url is not None)  # fails before anything runs when no endpoint can be reached
    if dry_run or len(requests) == 1:
        session.materialise(runner, home, requests, force, dry_run)
        return
    failed = []
    with session.writing(home):
        for req in requests:  # the kinds are independent: a failed one must not stop the other
            try:
                runner.materialise(req, force=force)
            except UserError as exc:
                if exc.exit_code != 1:
                    raise
                failed.append(str(exc))
    if failed:
        raise UserError("; ".join(failed), 1)


def embed_command(dataset: str, backbone: str | None, pretrained: str | None, batch_size: int, device: str,
                  force: bool, dry_run: bool, home: Path | None, config: Path | None) -> None:
    from pipeline.commands.dag import embed_request

    runner = session.make_runner(home)
    ds = session.load_config(config).dataset(dataset)
    req = embed_request(runner, ds, *session.backbone_pair(backbone, pretrained), batch_size, device)
    session.materialise(runner, home, [req], force, dry_run)


def frames_command(given: dict[str, Any], force: bool, dry_run: bool, no_progress: bool, home: Path | None,
                   config: Path | None) -> None:
    from pipeline.commands.dag import Selection, frames_request

    o = resolve(FramesOptions, given)
    o.check()
    runner = session.make_runner(home, progress=not no_progress)
    ds = session.load_config(config).dataset(o.dataset, Path(o.labels) if o.labels else None)
    workers = o.workers or max(1, min(8, os.cpu_count() or 2))
    req = frames_request(runner, ds, o.list_name, o.resolved_mode, Selection(o.shots, o.split), o.decoder, o.fmt,
                         o.skip_missing, o.strict, workers, dedupe=o.dedupe)
    art = session.materialise(runner, home, [req], force, dry_run)[0]
    if o.strict and art is not None and art.meta.get("failed"):  # a cached result is judged too
        raise UserError(f"{art.meta['failed']} videos of list {o.list_name!r} could not be decoded (--strict), e.g. "
                        f"{', '.join(art.meta['failed_videos'])}; see `msta-pipe sql \"select * from frame_failures\"`", 1)
