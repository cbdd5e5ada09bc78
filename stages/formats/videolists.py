"""Video lists: which videos, with which labels. Formats: ViFi-CLIP's `path label` lines,
SSv2's official train.json/validation.json, and a Kinetics-style CSV. Paths are kept inside
the dataset's video_root; labels are checked against the class list."""
from __future__ import annotations

import csv
import ctypes
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cache.errors import UserError
from stages.formats.textfiles import is_int, parse_json, read_text


class VideoItem(NamedTuple):
    relpath: str
    label: int


_CHUNK = 8192  # videos made into Python objects at a time


class VideoList(Sequence[VideoItem]):
    """A list's videos as arrays: every path's UTF-8 bytes in one buffer (never reordered), the
    positions of this list's videos in it, their labels and the line or entry each came from.
    240k videos held as Python tuples took 76 MB (94 MB while parsing); as arrays they take ~60
    bytes a video. Items are made as they are read. NumPy only: Arrow's memory pool keeps what it
    touches, and its `take` imports pyarrow.compute (~9 MB)."""

    def __init__(self, blob: bytes, ends: np.ndarray, labels: np.ndarray, where: np.ndarray | None = None,
                 positions: np.ndarray | None = None):
        self._blob, self._ends = blob, ends  # path i is blob[ends[i-1]:ends[i]]
        self.positions = np.arange(len(ends)) if positions is None else positions
        self.labels = labels.astype(np.int64, copy=False)
        self.where = np.arange(1, len(labels) + 1) if where is None else where  # line or entry numbers

    @classmethod
    def of(cls, items: Iterable[VideoItem]) -> VideoList:
        if isinstance(items, VideoList):
            return items
        collected = _Collector()
        for i, it in enumerate(items, start=1):
            collected.add(i, it.relpath, it.label)
        return cls(*collected.done())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        return VideoItem(self.take([i]).paths()[0], int(self.labels[i]))

    def __iter__(self) -> Iterator[VideoItem]:
        for first in range(0, len(self), _CHUNK):
            yield from map(VideoItem, self.paths(first, first + _CHUNK), self.labels[first:first + _CHUNK].tolist())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # arrays inside

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The paths of videos start..stop, as Python strings."""
        at = self.positions[start:stop]
        ends = self._ends[at]
        starts = np.where(at > 0, self._ends[np.maximum(at - 1, 0)], 0)
        return [self._blob[a:b].decode(errors="surrogatepass") for a, b in zip(starts.tolist(), ends.tolist())]

    def take(self, indices: Sequence[int] | np.ndarray) -> VideoList:
        indices = np.asarray(indices, dtype=np.int64)
        return VideoList(self._blob, self._ends, self.labels[indices], self.where[indices], self.positions[indices])

    def hashes(self) -> np.ndarray:
        """Python's hash of every path, a chunk of strings at a time: sets and sorts over 8-byte ints
        instead of 240k Python strings (equal hashes are then compared as strings)."""
        out = np.empty(len(self), dtype=np.int64)
        for first in range(0, len(self), _CHUNK):
            out[first:first + _CHUNK] = [hash(p) for p in self.paths(first, first + _CHUNK)]
        return out

    def without(self, drop: VideoList | Iterable[str]) -> VideoList:
        """The videos whose path is not among `drop`'s, in their order."""
        if not isinstance(drop, VideoList):
            drop = VideoList.of(VideoItem(p, 0) for p in drop)
        mine, theirs = self.hashes(), drop.hashes()
        hit = np.flatnonzero(np.isin(mine, theirs))  # compared as 8-byte ints, then as strings
        if not len(hit):
            return self
        dropped = set(drop.take(np.flatnonzero(np.isin(theirs, mine[hit]))).paths())
        keep = np.ones(len(self), dtype=bool)
        keep[hit[[p in dropped for p in self.take(hit).paths()]]] = False
        return self.take(np.flatnonzero(keep))


class _Collector:
    """(number, path, label) as a reader finds them, made into arrays a chunk at a time."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []
        self.lengths: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.where: list[np.ndarray] = []
        self.pending: list[tuple[int, str, int]] = []
        self.count = 0
        self.huge: dict[int, int] = {}  # position -> a label past int64 (stored as -1), for its error

    def add(self, where: int, relpath: str, label: int) -> None:
        if not -2**63 <= label < 2**63:
            self.huge[self.count] = label
            label = -1
        self.pending.append((where, relpath, label))
        self.count += 1
        if len(self.pending) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            where, paths, labels = zip(*self.pending)
            encoded = [p.encode(errors="surrogatepass") for p in paths]  # any str, as it came
            self.blobs.append(b"".join(encoded))
            self.lengths.append(np.array([len(e) for e in encoded], dtype=np.int64))
            self.labels.append(np.array(labels, dtype=np.int64))
            self.where.append(np.array(where, dtype=np.int64))
            self.pending = []

    def done(self) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
        """(blob, ends, labels, where) for VideoList."""
        self._flush()
        if not self.blobs:
            empty = np.zeros(0, dtype=np.int64)
            return b"", empty, empty, empty
        return (b"".join(self.blobs), np.cumsum(np.concatenate(self.lengths)), np.concatenate(self.labels),
                np.concatenate(self.where))


# Each reader returns what it counts ("line" or "entry") and the videos it collected.
Located = tuple[str, _Collector]


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.replace("[", "").replace("]", "").lower())


def read_video_list(path: Path, class_names: Sequence[str], dedupe: bool = False) -> VideoList:
    """Parse a list file; `class_names` are the raw names in id order (for name-labelled formats)."""
    return read_video_list_counted(path, class_names, dedupe)[0]


def read_video_list_counted(path: Path, class_names: Sequence[str], dedupe: bool = False) -> tuple[VideoList, int]:
    """(the list's videos, how many repeated lines `dedupe` dropped). A video listed twice is refused,
    naming both lines, unless `dedupe` keeps its first line: silently it would train under two
    labels, or count twice."""
    raw = read_text(path, "video list")
    stripped = raw.lstrip()
    if not stripped:
        raise UserError(f"video list {path} is empty", 2)
    if stripped.startswith("["):
        word, found = _read_ssv2_json(path, raw, class_names)
    elif stripped.split("\n", 1)[0].lower().replace(" ", "").startswith("label,youtube_id"):
        word, found = _read_kinetics_csv(path, raw, class_names)
    else:
        word, found = _read_pairs(path, raw)
    del raw, stripped
    items = VideoList(*found.done())
    bad = np.flatnonzero((items.labels < 0) | (items.labels >= len(class_names)))
    if len(bad):
        label = found.huge.get(int(bad[0]), items.labels[bad[0]])
        raise UserError(f"{path} {word} {items.where[bad[0]]}: label {label} is outside the class list's ids 0.."
                        f"{len(class_names) - 1} ({len(bad)} such entries; none is used). Is this list meant for "
                        "another label set (base/novel halves renumber their ids)?", 2)
    first, firsts = _first_lines(items)
    _return_freed_heap()
    if first.all():
        return items, 0
    if not dedupe:
        again = int(np.argmin(first))  # the earliest line that repeats a video
        it = items[again]
        seen = firsts[it.relpath]
        before = items[seen]
        labels_differ = "" if before.label == it.label else f" with another label ({before.label} there, {it.label} here)"
        raise UserError(f"{path} {word} {items.where[again]}: video {it.relpath} is listed again (first at {word} "
                        f"{items.where[seen]}){labels_differ}; remove one line, or pass --dedupe to keep each video's "
                        "first line", 2)
    return items.take(np.flatnonzero(first)), int((~first).sum())


def _return_freed_heap() -> None:
    """Parsing freed about as much as the arrays hold (a chunk's Python objects, the text, the
    chunks before they were joined); glibc keeps freed heap pages mapped, and DuckDB and Arrow do not
    allocate from them, so give them back (13 MB of 27 at 240k lines)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def _first_lines(items: VideoList) -> tuple[np.ndarray, dict[str, int]]:
    """Whether each video is its path's first occurrence, and the first position of every path
    that shares a hash with another (only those are compared as strings)."""
    hashes = items.hashes()
    order = np.argsort(hashes, kind="stable")
    same = hashes[order][1:] == hashes[order][:-1]
    shared = np.sort(order[np.flatnonzero(np.r_[same, False] | np.r_[False, same])])
    first = np.ones(len(items), dtype=bool)
    firsts: dict[str, int] = {}
    for i, p in zip(shared.tolist(), items.take(shared).paths()):
        first[i] = firsts.setdefault(p, i) == i
    return first, firsts


def _lines(raw: str) -> Iterator[str]:
    """The lines of `raw`, each with its line break: io.StringIO would copy the whole text into a
    buffer 4 bytes a character (30 MB for a 240k-line list, which the allocator then kept)."""
    start = 0
    while start < len(raw):
        end = raw.find("\n", start)
        end = len(raw) if end < 0 else end + 1
        yield raw[start:end]
        start = end


def _read_pairs(path: Path, raw: str) -> Located:
    items = _Collector()
    for lineno, line in enumerate(_lines(raw), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not is_int(parts[1]):
            raise UserError(f"{path} line {lineno}: expected `relative/path.ext label_id`, got {line.strip()!r}", 2)
        items.add(lineno, parts[0].strip(), int(parts[1]))
    return "line", items


def _read_ssv2_json(path: Path, raw: str, class_names: Sequence[str]) -> Located:
    data = parse_json(path, raw, "SSv2's train.json/validation.json")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{\"id\", \"template\"}} entries (SSv2's train.json)", 2)
    index = {_norm(n): i for i, n in enumerate(class_names)}
    items = _Collector()
    for k, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("template"), str) or "id" not in entry:
            raise UserError(f"{path}: entry {k + 1} lacks `id`/`template` (SSv2 train.json/validation.json format)", 2)
        label = index.get(_norm(entry["template"]))
        if label is None:
            raise UserError(f"{path}: entry {k + 1} has template {entry['template']!r}, not in the class list", 2)
        items.add(k + 1, f"{entry['id']}.webm", label)
    return "entry", items


def _read_kinetics_csv(path: Path, raw: str, class_names: Sequence[str]) -> Located:
    index = {_norm(n): i for i, n in enumerate(class_names)}
    items = _Collector()
    for lineno, row in enumerate(csv.DictReader(_lines(raw)), start=2):
        try:
            label = index[_norm(row["label"] or "")]
            name = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
        except KeyError:
            raise UserError(f"{path} line {lineno}: label {row.get('label')!r} is not in the class list", 2) from None
        except (TypeError, ValueError):
            raise UserError(f"{path} line {lineno}: expected label,youtube_id,time_start,time_end,split", 2) from None
        items.add(lineno, f"{row.get('split') or 'train'}/{name}", label)
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
                   flag: str = "--shots") -> VideoList:
    """K videos per class (all with k=None), stratified and reproducible: a seeded permutation of
    each class's videos in path order, so the draw does not depend on the list's line order."""
    items = VideoList.of(items)
    if k is not None and k < 1:  # a negative k would slice off the last -k videos of every class instead
        raise UserError(f"cannot draw {k} videos per class: --shots must be at least 1", 2)
    if len(items) and not 0 <= items.labels.min() <= items.labels.max() < len(class_names):
        raise UserError(f"cannot draw from labels outside the class list's ids 0..{len(class_names) - 1}", 2)
    counts = np.bincount(items.labels, minlength=len(class_names))
    short = np.flatnonzero(counts[:len(class_names)] < (k or 0))
    if len(short):
        c = int(short[0])
        raise UserError(f"cannot draw {k} videos per class: class {c} ({class_names[c]!r}) has only {counts[c]} "
                        f"({len(short)} classes are short); lower {flag} or use a larger list", 2)
    rng = np.random.default_rng(seed)
    by_label = np.argsort(items.labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    drawn = []
    for c in range(len(counts)):  # one class's paths at a time as Python strings
        members = by_label[starts[c]:starts[c + 1]]
        paths = items.take(members).paths()
        pool = members[sorted(range(len(paths)), key=paths.__getitem__)]
        if k is None:
            drawn.append(pool)
        elif c < len(class_names):
            drawn.append(pool[np.sort(rng.permutation(len(pool))[:k])])
    return items.take(np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64))
