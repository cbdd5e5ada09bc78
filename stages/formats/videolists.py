"""Video lists: which videos, with which labels. Formats: ViFi-CLIP's `path label` lines,
SSv2's official train.json/validation.json, and a Kinetics-style CSV. Paths are kept inside
the dataset's video_root; labels are checked against the class list."""
from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cache.errors import UserError
from stages.formats.textfiles import is_int, parse_json, read_text


class VideoItem(NamedTuple):  # a tuple, not a dataclass: a Kinetics list holds 240k of them
    relpath: str
    label: int


# Each reader returns what it counts ("line" or "entry") and (number, item) pairs, for errors.
Located = tuple[str, list[tuple[int, VideoItem]]]


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.replace("[", "").replace("]", "").lower())


def read_video_list(path: Path, class_names: Sequence[str], dedupe: bool = False) -> list[VideoItem]:
    """Parse a list file; `class_names` are the raw names in id order (for name-labelled formats)."""
    return read_video_list_counted(path, class_names, dedupe)[0]


def read_video_list_counted(path: Path, class_names: Sequence[str], dedupe: bool = False
                            ) -> tuple[list[VideoItem], int]:
    """(the list's items, how many repeated lines `dedupe` dropped). A video listed twice is refused,
    naming both lines, unless `dedupe` keeps its first line: silently it would train under two
    labels, or count twice."""
    raw = read_text(path, "video list")
    stripped = raw.lstrip()
    if not stripped:
        raise UserError(f"video list {path} is empty", 2)
    if stripped.startswith("["):
        word, items = _read_ssv2_json(path, raw, class_names)
    elif stripped.split("\n", 1)[0].lower().replace(" ", "").startswith("label,youtube_id"):
        word, items = _read_kinetics_csv(path, raw, class_names)
    else:
        word, items = _read_pairs(path, raw)
    del raw, stripped
    bad = [(where, it.label) for where, it in items if not 0 <= it.label < len(class_names)]
    if bad:
        raise UserError(f"{path} {word} {bad[0][0]}: label {bad[0][1]} is outside the class list's ids 0.."
                        f"{len(class_names) - 1} ({len(bad)} such entries; none is used). Is this list meant for "
                        "another label set (base/novel halves renumber their ids)?", 2)
    first: dict[str, int] = {}  # relpath -> position in items
    kept: list[VideoItem] = []
    for i, (where, it) in enumerate(items):
        seen = first.setdefault(it.relpath, i)
        if seen == i:
            kept.append(it)
        elif not dedupe:
            there, before = items[seen]
            labels = "" if before.label == it.label else f" with another label ({before.label} there, {it.label} here)"
            raise UserError(f"{path} {word} {where}: video {it.relpath} is listed again (first at {word} {there})"
                            f"{labels}; remove one line, or pass --dedupe to keep each video's first line", 2)
    return kept, len(items) - len(kept)


def _read_pairs(path: Path, raw: str) -> Located:
    items = []
    for lineno, line in enumerate(io.StringIO(raw), start=1):  # line by line: no second copy of the file
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not is_int(parts[1]):
            raise UserError(f"{path} line {lineno}: expected `relative/path.ext label_id`, got {line.strip()!r}", 2)
        items.append((lineno, VideoItem(parts[0].strip(), int(parts[1]))))
    return "line", items


def _read_ssv2_json(path: Path, raw: str, class_names: Sequence[str]) -> Located:
    data = parse_json(path, raw, "SSv2's train.json/validation.json")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{\"id\", \"template\"}} entries (SSv2's train.json)", 2)
    index = {_norm(n): i for i, n in enumerate(class_names)}
    items = []
    for k, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("template"), str) or "id" not in entry:
            raise UserError(f"{path}: entry {k + 1} lacks `id`/`template` (SSv2 train.json/validation.json format)", 2)
        label = index.get(_norm(entry["template"]))
        if label is None:
            raise UserError(f"{path}: entry {k + 1} has template {entry['template']!r}, not in the class list", 2)
        items.append((k + 1, VideoItem(f"{entry['id']}.webm", label)))
    return "entry", items


def _read_kinetics_csv(path: Path, raw: str, class_names: Sequence[str]) -> Located:
    index = {_norm(n): i for i, n in enumerate(class_names)}
    items = []
    for lineno, row in enumerate(csv.DictReader(io.StringIO(raw)), start=2):
        try:
            label = index[_norm(row["label"] or "")]
            name = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
        except KeyError:
            raise UserError(f"{path} line {lineno}: label {row.get('label')!r} is not in the class list", 2) from None
        except (TypeError, ValueError):
            raise UserError(f"{path} line {lineno}: expected label,youtube_id,time_start,time_end,split", 2) from None
        items.append((lineno, VideoItem(f"{row.get('split') or 'train'}/{name}", label)))
    return "line", items


def missing_videos(items: Sequence[VideoItem], root: Path, list_path: Path) -> list[str]:
    """The relative paths of listed files that do not exist, refusing any path that leaves `root`.
    A path that cannot be resolved (a symlink loop) is not missing: it fails as a video."""
    root = root.resolve()
    missing = []
    for it in items:
        try:
            p = (root / it.relpath).resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
            continue
        if not p.is_relative_to(root):
            raise UserError(f"{list_path}: {it.relpath!r} resolves outside the video_root {root}; refusing it", 2)
        if not p.exists():
            missing.append(it.relpath)
    return missing


def draw_per_class(items: Sequence[VideoItem], k: int | None, seed: int, class_names: Sequence[str],
                   flag: str = "--shots") -> list[VideoItem]:
    """K videos per class (all with k=None), stratified and reproducible: a seeded permutation of
    each class's videos in path order, so the draw does not depend on the list's line order."""
    by_class: dict[int, list[VideoItem]] = defaultdict(list)
    for it in items:
        by_class[it.label].append(it)
    if k is None:
        return sorted(items, key=lambda it: (it.label, it.relpath))
    if k < 1:  # a negative k would slice off the last -k videos of every class instead
        raise UserError(f"cannot draw {k} videos per class: --shots must be at least 1", 2)
    short = [(c, len(by_class.get(c, []))) for c in range(len(class_names)) if len(by_class.get(c, [])) < k]
    if short:
        c, have = short[0]
        raise UserError(f"cannot draw {k} videos per class: class {c} ({class_names[c]!r}) has only {have} "
                        f"({len(short)} classes are short); lower {flag} or use a larger list", 2)
    rng = np.random.default_rng(seed)
    out: list[VideoItem] = []
    for c in range(len(class_names)):
        pool = sorted(by_class[c], key=lambda it: it.relpath)
        out += [pool[i] for i in sorted(rng.permutation(len(pool))[:k])]
    return out
