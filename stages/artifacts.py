"""Readers of the artifacts one stage hands another: the one place a stage learns what another wrote.

classes (labels) and the names a prompt takes, the clip index of a frames artifact and the
per-class description embeddings (embed). A trained model is read in stages/models.py. Stages,
`predict` and `export` read them here, so every artifact is read one way everywhere and no stage
imports another.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cache.catalog import Catalog
from cache.errors import UserError
from cache.store import sha256_file
from stages.engine.stage import Artifact
from prompts import KINDS


# -- labels -------------------------------------------------------------------------------
def read_classes(artifact: Artifact) -> list[tuple[int, str, str]]:
    """(class_id, raw_name, name) rows of a classes artifact, in id order."""
    import pyarrow.parquet as pq

    t = pq.ParquetFile(artifact.path).read()  # not read_table: it imports pyarrow.dataset (~0.3 s)
    return list(zip(t["class_id"].to_pylist(), t["raw_name"].to_pylist(), t["name"].to_pylist()))


# -- frames -------------------------------------------------------------------------------
def prompt_names(classes: list[tuple[int, str, str]], class_names: str) -> list[str]:
    """The names that fill a run's prompt template: the display names, or (`raw`) the class list's own
    spelling, as ViFi-CLIP and the authors put it (UCF-101's `ApplyEyeMakeup`)."""
    if class_names not in ("display", "raw"):
        raise ValueError(f"class_names must be display or raw, not {class_names!r}")
    return [raw if class_names == "raw" else name for _, raw, name in classes]


def read_frame_index(artifact_path: Path, home: Path) -> tuple[list[tuple[str, int]], list[str | None]]:
    """((absolute clip path, label) in list order, the registered sha256 of each clip). No clip is read
    here: the loader checks each digest where it reads the clip whole anyway (msta ClipAltered), so
    start-up does not grow with the list, and `clips_checked` turns a mismatch into a rerun."""
    rows = pq.read_table(artifact_path, columns=["label", "entry_key", "clip_path"]).to_pylist()
    registered = registered_clips(Catalog(home), [r["entry_key"] for r in rows], digests=True)
    items = [(str(home / r["clip_path"]), int(r["label"])) for r in rows]
    return items, [registered.get(r["entry_key"], (-1, None))[1] for r in rows]


@contextmanager
def clips_checked() -> Iterator[None]:
    """Around a loop over cached clips: a clip the loader found altered, damaged or gone becomes one line
    and exit 1, after the clip is removed, so that the rerun's `frames` stage decodes it anew (a training
    resumes from its last epoch). A DataLoader worker's error arrives as text: the path is read from it."""
    import re

    from msta.video.clipstore import ALTERED, ClipStoreError

    try:
        yield
    except (ClipStoreError, FileNotFoundError) as exc:
        text = str(exc)
        m = (re.search(re.escape(ALTERED) + r"(.+?)$", text, re.M)
             or re.search(r"No such file or directory: '(.+?)'", text)
             or re.search(r"(?:^|ClipStoreError: )(\S+?\.clip): (?:not a clip|corrupt or partial)", text, re.M))
        path = str(getattr(exc, "filename", None) or (m.group(1) if m else ""))
        if not path.endswith(".clip"):  # not a cached clip (a checkpoint, a plot): not ours to remove
            raise
        Path(path).unlink(missing_ok=True)
        raise UserError(f"the cached clip {path} was missing or altered and is now removed: rerun the command, "
                        "whose `frames` stage decodes it anew (a training resumes from its last epoch)", 1) from None


def registered_clips(catalog: Catalog, keys: list[str], digests: bool) -> dict[str, tuple[int, str | None]]:
    """entry_key -> (bytes, sha256 or None) of the registered clips among `keys`; `digests=False`
    reads sizes only (a catalog `status` has not migrated may predate the digest column)."""
    with catalog.reader() as con:  # only these keys leave the catalog, not every clip's
        con.register("_wanted_keys", pa.table({"entry_key": pa.array(keys, pa.string())}))
        try:
            return {k: (size, sha) for k, size, sha in con.execute(
                f"SELECT entry_key, bytes, {'sha256' if digests else 'NULL'} FROM frame_clips "
                "JOIN _wanted_keys USING (entry_key)").fetchall()}
        finally:
            con.unregister("_wanted_keys")


def clip_intact(path: str, size: int, sha256: str | None, verify: bool) -> bool:
    """A clip file still has its registered size and, with `verify` and a known digest, its digest."""
    try:
        if os.path.getsize(path) != size:
            return False
    except OSError:
        return False
    return not (verify and sha256) or sha256_file(path) == sha256


# -- embed --------------------------------------------------------------------------------
def read_class_embeddings(path: "str | object", class_ids: list[int]) -> dict[str, "object"]:
    """The per-class means {kind: tensor (C, D)} of an embed artifact, in the order of `class_ids`."""
    import torch

    t = pq.read_table(path, filters=[("level", "=", "class")]).to_pylist()
    index = {(r["kind"], r["class_id"]): r["embedding"] for r in t}
    missing = [c for c in class_ids if ("spatial", c) not in index or ("temporal", c) not in index]
    if missing:
        raise UserError(f"the description embeddings lack classes {missing[:5]}", 2)
    return {k: torch.tensor([index[(k, c)] for c in class_ids], dtype=torch.float32) for k in KINDS}
