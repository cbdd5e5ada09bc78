"""Datasets: built-in names with the paper's settings, user datasets from `msta.toml`.

A dataset has a class list, a video root, named video lists and video settings. Built-ins
know their test views (msta/METHOD.md §3) and the ViFi-CLIP file names, so a user only points
at the files they have; nothing is shipped or downloaded.

    [datasets.hmdb51]
    labels = "labels/hmdb_51_labels.csv"
    video_root = "/data/hmdb51"
    splits_dir = "datasets_splits/hmdb_splits"        # ViFi-CLIP names -> lists
    base_labels = "labels/hmdb_51_base_labels.csv"      # defines hmdb51-base ...
    novel_labels = "labels/hmdb_51_novel_labels.csv"    # ... and hmdb51-novel
    b2n_splits_dir = "datasets_splits/base2novel_splits/hmdb_splits"
    [datasets.hmdb51.lists]
    extra = "my_list.txt"
    [datasets.hmdb51.video]
    test_clips = 10
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cache.errors import UserError
from msta.video import augment
from stages.formats.textfiles import read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class VideoSettings:
    frames: int = 8
    samplings: int = 2  # TSN draws cached per training video, so that epochs still vary
    pool: int = 0  # > 0: cache up to this many frames per training video; every epoch draws anew
    train_short_side: int = 256
    test_short_side: int = 224
    crop_size: int = 224
    test_clips: int = 1
    test_crops: int = 3
    hflip: float = augment.HFLIP
    color_jitter: float = augment.COLOR_JITTER
    grayscale: float = augment.GRAYSCALE


@dataclass(frozen=True)
class Builtin:
    labels_hint: str
    test_clips: int
    splits: dict[str, str] = field(default_factory=dict)  # ViFi-CLIP file name -> list name
    b2n: bool = True


_FEW_SHOT = {f"train1_few_shot_{k}.txt": f"few_shot_{k}" for k in (2, 4, 8, 16)}
_B2N = {"fs_base_s1_train.txt": "train_s1", "fs_base_s2_train.txt": "train_s2",
        "fs_base_s3_train.txt": "train_s3", "base_val.txt": "val", "base_train.txt": "train"}
_HMDB_UCF = {**_FEW_SHOT, "val1.txt": "test", "val2.txt": "test_2", "val3.txt": "test_3"}

BUILTINS: dict[str, Builtin] = {
    "ssv2": Builtin("ssv2_labels.csv (ViFi-CLIP labels/) or SSv2's labels.json", 2,
                    {**_FEW_SHOT, "validation.txt": "test"}),
    "k400": Builtin("kinetics_400_labels.csv (ViFi-CLIP labels/)", 4, {"val.txt": "test"}),
    "k600": Builtin("kinetics_600_labels.csv (ViFi-CLIP labels/)", 4, {}, b2n=False),
    "hmdb51": Builtin("hmdb_51_labels.csv (ViFi-CLIP labels/)", 10, _HMDB_UCF),
    "ucf101": Builtin("ucf_101_labels.csv (ViFi-CLIP labels/) or UCF-101's classInd.txt", 5, _HMDB_UCF),
}
# The datasets of the paper (msta/METHOD.md §5): what `--recipe authors` can place.
PAPER_DATASETS = ("hmdb51", "ucf101", "ssv2", "k400", "k600")
# K600's zero-shot protocol: three splits of 160 classes new to K400, each its own label set
for _n in (1, 2, 3):
    BUILTINS[f"k600-zs{_n}"] = Builtin(f"ZS_split{_n}_K600.csv (ViFi-CLIP labels/)", 4,
                                       {f"ZS_split{_n}_K600_eval.txt": "test"}, b2n=False)


@dataclass(frozen=True)
class Dataset:
    name: str
    labels: Path | None
    video_root: Path | None
    lists: dict[str, Path]
    video: VideoSettings
    source: str  # where it was declared, for error messages
    paper: str | None = None  # which of the paper's datasets this is (built-ins; `paper = "..."` in a config)

    def list_path(self, name: str) -> Path:
        if name not in self.lists:
            known = ", ".join(sorted(self.lists)) or "none"
            raise UserError(f"dataset {self.name!r} has no video list {name!r} (known: {known}); "
                            f"declare it under [datasets.{self.name}.lists] in {self.source}", 2)
        return self.lists[name]

    def require_labels(self) -> Path:
        if self.labels is None:
            builtin = BUILTINS.get(self.name) or BUILTINS.get(self.name.rsplit("-", 1)[0])
            hint = f" (for {self.name}: {builtin.labels_hint})" if builtin else ""
            raise UserError(
                f"no class list configured for dataset {self.name!r}: set `labels = \"PATH\"` under "
                f"[datasets.{self.name}] in {self.source} (describe and frames also take --labels PATH)"
                f"{hint}. Readable "
                "formats: an `id,name` CSV, SSv2's labels.json, UCF-101's classInd.txt, or one "
                "name per line.", 2)
        return self.labels

    def require_video_root(self) -> Path:
        if self.video_root is None:
            raise UserError(f"no video_root configured for dataset {self.name!r}: set "
                            f"`video_root = \"DIR\"` under [datasets.{self.name}] in {self.source}", 2)
        return self.video_root


class Config:
    """The datasets of a `msta.toml` (and the files it includes) plus the built-ins."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._declared: dict[str, tuple[dict[str, Any], Path]] = {}
        if path is not None:
            self._load(path, seen=set())

    def _load(self, path: Path, seen: set[Path], included: bool = False) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        try:
            data = tomllib.loads(read_text(path, "included config file" if included else "config file"))
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"config file {path} is not valid TOML: {exc}", 2) from None
        include = data.get("include", [])
        include = [include] if isinstance(include, str) else include
        if not isinstance(include, list) or not all(isinstance(inc, str) for inc in include):
            raise UserError(f"{path}: `include` must be a file name or a list of file names, not "
                            f"{data['include']!r}", 2)
        for inc in include:
            self._load((path.parent / inc), seen, included=True)
        datasets = data.get("datasets", {})
        if not isinstance(datasets, dict):
            raise UserError(f"{path}: `datasets` must be a table of [datasets.NAME] sections, not {datasets!r}", 2)
        for name, table in datasets.items():
            if not isinstance(table, dict):
                raise UserError(f"{path}: [datasets.{name}] must be a table", 2)
            _check_types(path, name, table)
            self._declared[name] = (table, path.parent)

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "msta.toml (none found; pass --config)"

    def dataset(self, name: str, labels: Path | None = None) -> Dataset:
        """A dataset by name; with `labels`, an undeclared name is fine (a class list is all describe needs)."""
        if labels is not None and not self._known(name):
            return Dataset(name, labels.resolve(), None, {}, VideoSettings(), self.source)
        ds = self._dataset(name)
        return replace(ds, labels=labels.resolve()) if labels is not None else ds

    def _known(self, name: str) -> bool:
        parent = name.rsplit("-", 1)[0] if name.endswith(("-base", "-novel")) else name
        return name in self._declared or parent in self._declared or parent in BUILTINS

    def _dataset(self, name: str) -> Dataset:
        if name in self._declared:
            table, base = self._declared[name]
            return self._from_table(name, table, base, BUILTINS.get(name), name)
        for suffix in ("-base", "-novel"):
            parent = name[: -len(suffix)] if name.endswith(suffix) else None
            if parent and parent in self._declared | BUILTINS:
                return self._half(parent, suffix[1:])
        if name in BUILTINS:
            return self._from_table(name, {}, Path.cwd(), BUILTINS[name], name)
        raise UserError(f"unknown dataset {name!r}: built-in names are {', '.join(sorted(BUILTINS))} "
                        "(ssv2, k400, hmdb51 and ucf101 also with -base/-novel halves); declare others under "
                        f"[datasets.NAME] in {self.source}, or pass --labels PATH to describe a class list", 2)

    def _half(self, parent: str, half: str) -> Dataset:
        """`NAME-base` / `NAME-novel` from the parent's base_labels / novel_labels keys."""
        table, base = self._declared.get(parent, ({}, Path.cwd()))
        builtin = BUILTINS.get(parent)
        if builtin is not None and not builtin.b2n:
            raise UserError(f"dataset {parent!r} has no base-to-novel protocol", 2)
        derived: dict[str, Any] = {k: v for k, v in table.items() if k in ("video_root", "video", "paper")}
        if f"{half}_labels" in table:
            derived["labels"] = table[f"{half}_labels"]
        b2n_dir = table.get("b2n_splits_dir")
        lists: dict[str, str] = {}
        if b2n_dir:
            names = _B2N if half == "base" else {"novel_val.txt": "val"}
            lists = {lst: str(Path(b2n_dir) / f) for f, lst in names.items() if (base / b2n_dir / f).exists()}
        derived["lists"] = lists
        return self._from_table(f"{parent}-{half}", derived, base, builtin, parent)

    def _from_table(self, name: str, table: dict[str, Any], base: Path, builtin: Builtin | None,
                    builtin_name: str) -> Dataset:
        known = {"labels", "video_root", "lists", "video", "splits_dir", "base_labels",
                 "novel_labels", "b2n_splits_dir", "paper"}
        unknown = set(table) - known
        if unknown:
            raise UserError(f"{self.source}: unknown keys {sorted(unknown)} under [datasets.{name}] "
                            f"(known: {sorted(known)})", 2)

        def resolve(p: Any) -> Path:
            return (base / str(p)).resolve()

        lists: dict[str, Path] = {}
        if table.get("splits_dir") and builtin is not None:
            for fname, lst in builtin.splits.items():
                candidate = resolve(table["splits_dir"]) / fname
                if candidate.exists():
                    lists[lst] = candidate
        lists.update({k: resolve(v) for k, v in table.get("lists", {}).items()})
        video = VideoSettings(test_clips=builtin.test_clips) if builtin else VideoSettings()
        overrides = table.get("video", {})
        valid = {f.name: f.type for f in fields(VideoSettings)}
        bad = set(overrides) - set(valid)
        if bad:
            raise UserError(f"{self.source}: unknown keys {sorted(bad)} under [datasets.{name}.video] "
                            f"(known: {sorted(valid)})", 2)
        video = replace(video, **overrides)
        paper = table.get("paper", builtin_name if builtin_name in PAPER_DATASETS else None)
        if paper is not None and paper not in PAPER_DATASETS:
            raise UserError(f"{self.source}: [datasets.{name}] paper = {paper!r}: the paper's datasets are "
                            f"{', '.join(PAPER_DATASETS)}", 2)
        return Dataset(name=name, paper=paper,
                       labels=resolve(table["labels"]) if "labels" in table else None,
                       video_root=resolve(table["video_root"]) if "video_root" in table else None,
                       lists=lists, video=video, source=self.source)


_PATH_KEYS = ("labels", "video_root", "splits_dir", "base_labels", "novel_labels", "b2n_splits_dir")
# Bounds of the [datasets.NAME.video] keys; an integer key not named here must be at least 1.
_VIDEO_BOUNDS: dict[str, tuple[float, float]] = {
    "pool": (0, float("inf")), "hflip": (0, 1), "color_jitter": (0, 1), "grayscale": (0, 1)}


def _check_types(path: Path, name: str, table: dict[str, Any]) -> None:
    """The types of a dataset's keys, up front: a number where a path belongs, or `frames = "eight"`,
    must stop here with the key's name, not as a traceback or as every video failing to decode."""
    def bad(key: str, want: str, value: Any) -> UserError:
        return UserError(f"{path}: [datasets.{name}] {key} must be {want}, not {value!r}", 2)

    for key in _PATH_KEYS:
        if key in table and not isinstance(table[key], str):
            raise bad(key, "a path in quotes", table[key])
    lists = table.get("lists", {})
    if not isinstance(lists, dict) or not all(isinstance(v, str) for v in lists.values()):
        raise bad("lists", 'a table of NAME = "path" entries', lists)
    video = table.get("video", {})
    if not isinstance(video, dict):
        raise bad("video", "a table", video)
    defaults = VideoSettings()
    for key, value in video.items():
        if not hasattr(defaults, key):
            continue  # unknown keys are reported beside the known ones when the dataset is used
        integer = isinstance(getattr(defaults, key), int)
        low, high = _VIDEO_BOUNDS.get(key, (1, float("inf")))
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise bad(f"video.{key}", kind, value)
        if not low <= value <= high:  # also refuses nan
            raise bad(f"video.{key}", f"{kind} in [{low:g}, {high:g}]", value)
