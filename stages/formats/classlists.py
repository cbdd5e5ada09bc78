"""Class lists in the formats users have: ViFi-CLIP `id,name` CSV, SSv2 `labels.json`,
UCF-101 `classInd.txt`, or one name per line. Ids come out 0-based and contiguous because
the video lists use them as indices."""
from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cache.errors import UserError
from stages.formats.textfiles import is_int, parse_json, read_text

FORMATS_HELP = ("an `id,name` CSV with header (ViFi-CLIP labels/), SSv2's labels.json, "
                "UCF-101's classInd.txt (`1 ApplyEyeMakeup`), or a plain file with one class name per line")


@dataclass(frozen=True)
class ClassName:
    class_id: int
    raw_name: str
    name: str


def display_name(raw: str) -> str:
    """`ApplyEyeMakeup` -> `apply eye makeup`, `brush_hair` -> `brush hair`, brackets dropped."""
    text = raw.replace("_", " ").replace("[", "").replace("]", "")
    if " " not in text.strip() and re.search(r"[a-z][A-Z]", text):
        text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", text).lower()
    text = re.sub(r"\s+", " ", text).strip()
    # sentence case from SSv2 ("Approaching ...") reads oddly inside "a video of {name}."
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    return text


def read_class_list(path: Path) -> list[ClassName]:
    raw = read_text(path, "class list", FORMATS_HELP)
    if not raw.strip():
        raise UserError(f"class list {path} is empty; expected {FORMATS_HELP}", 2)
    stripped = raw.lstrip()
    if stripped.startswith("{"):
        pairs = _read_ssv2_json(path, raw)
    else:
        first = stripped.splitlines()[0].strip().lower().replace(" ", "")
        if first in ("id,name", '"id","name"'):
            pairs = _read_id_name_csv(path, raw)
        elif re.fullmatch(r"[0-9]+\s+\S.*", stripped.splitlines()[0].strip()):
            pairs = _read_class_ind(path, raw)
        else:
            pairs = [(i, line.strip()) for i, line in enumerate(l for l in raw.splitlines() if l.strip())]
    return _validated(path, pairs)


def _read_id_name_csv(path: Path, raw: str) -> list[tuple[int, str]]:
    pairs = []
    reader = csv.reader(io.StringIO(raw))
    next(reader)
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2 or not is_int(row[0].strip()):
            raise UserError(f"{path} line {lineno}: expected `id,name` (an integer id, a comma, a name; "
                            f"quote names that contain commas), got {','.join(row)!r}", 2)
        pairs.append((int(row[0]), row[1].strip()))
    return pairs


def _read_ssv2_json(path: Path, raw: str) -> list[tuple[int, str]]:
    data = parse_json(path, raw, "SSv2's labels.json "
                      '({"Approaching [something] with your camera": "0", ...})')
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object mapping template to id, like SSv2's labels.json", 2)
    pairs = []
    for name, idx in data.items():
        if not is_int(str(idx).strip()) or str(idx).strip().startswith("-"):
            raise UserError(f"{path}: class {name!r} has id {idx!r}, expected an integer string", 2)
        pairs.append((int(idx), name.replace("[", "").replace("]", "")))
    return sorted(pairs)


def _read_class_ind(path: Path, raw: str) -> list[tuple[int, str]]:
    pairs = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not is_int(parts[0]) or parts[0].startswith("-"):
            raise UserError(f"{path} line {lineno}: expected `<number> <ClassName>` as in UCF-101's "
                            f"classInd.txt, got {line!r}", 2)
        pairs.append((int(parts[0]), parts[1].strip()))
    base = min(i for i, _ in pairs)
    return [(i - base, n) for i, n in pairs]  # classInd counts from 1, the lists from 0


def _validated(path: Path, pairs: list[tuple[int, str]]) -> list[ClassName]:
    """Linear in the number of classes (counting, not list.count per entry: 100k labels in well under
    a second; benchmarks/labels_scaling.py)."""
    if not pairs:
        raise UserError(f"{path} holds no classes; expected {FORMATS_HELP}", 2)
    ids = Counter(i for i, _ in pairs)
    if len(ids) != len(pairs) or min(ids) != 0 or max(ids) != len(pairs) - 1:
        missing = sorted(set(range(len(pairs))) - set(ids))[:5]
        dup = sorted(i for i, count in ids.items() if count > 1)[:5]
        raise UserError(f"{path}: class ids must be 0..{len(pairs) - 1} without gaps or repeats "
                        f"(missing {missing}, repeated {dup})", 2)
    empty = [i for i, n in pairs if not n]
    if empty:
        raise UserError(f"{path}: class ids {empty[:5]} have an empty name", 2)
    repeated = sorted(n for n, count in Counter(n for _, n in pairs).items() if count > 1)
    if repeated:
        raise UserError(f"{path}: class names appear more than once: {repeated[:5]}", 2)
    return [ClassName(i, n, display_name(n)) for i, n in sorted(pairs)]
