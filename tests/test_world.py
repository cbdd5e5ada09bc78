"""The procedural world: determinism, the reversal construction, class semantics, dataset files."""

from __future__ import annotations

import csv
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from msta.world import generate as world

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

N_CLASSES = len(world.CLASSES)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_list(path: Path) -> list[tuple[str, int]]:
    rows = [line.split(" ") for line in path.read_text().splitlines()]
    return [(rel, int(label)) for rel, label in rows]


def _read_labels(path: Path) -> dict[int, str]:
    with path.open(newline="") as f:
        return {int(row["id"]): row["name"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return world.write_dataset(tmp_path_factory.mktemp("world") / "a", 2, 1, seed=7)


# ----------------------------------------------------------------------------- classes


def test_class_constants_split_pairs_between_halves() -> None:
    assert N_CLASSES == 12
    assert sorted(world.BASE_CLASSES + world.NOVEL_CLASSES) == list(range(N_CLASSES))
    assert len(world.BASE_CLASSES) == len(world.NOVEL_CLASSES) == 6
    for a, b in world.REVERSAL_PAIRS:
        assert (a in world.BASE_CLASSES) == (b in world.BASE_CLASSES)
    paired = {c for pair in world.REVERSAL_PAIRS for c in pair}
    assert paired.isdisjoint(world.APPEARANCE_CLASSES)
    assert paired | set(world.APPEARANCE_CLASSES) == set(range(N_CLASSES))


# ----------------------------------------------------------------------------- rendering


def test_render_image_is_deterministic_and_captioned_from_the_vocabulary() -> None:
    image, caption = world.render_image(_rng(3))
    again, caption_again = world.render_image(_rng(3))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image, again) and caption == caption_again
    other = [world.render_image(_rng(s)) for s in range(4, 12)]
    assert not any(np.array_equal(image, o[0]) for o in other)
    for _, text in [(image, caption), *other]:
        attrs = world.parse_caption(text)
        assert world.caption(**attrs) == text
        assert attrs["size_name"] in world.SIZES and attrs["colour"] in world.COLOURS
        assert attrs["shape"] in world.SHAPES and attrs["position"] in world.POSITIONS


def test_render_image_honours_fixed_attributes() -> None:
    fixed = {"size_name": "large", "colour": "green", "shape": "ring",
             "position": "in the top left corner"}
    image, text = world.render_image(_rng(0), 32, **fixed)
    assert image.shape == (32, 32, 3)
    assert text == "a large green ring in the top left corner"
    # The object sits in the top-left quarter: that is where the green channel peaks.
    green = image[..., 1].astype(float) - image[..., [0, 2]].mean(axis=-1)
    y, x = np.unravel_index(np.argmax(green), green.shape)
    assert x < 16 and y < 16


@pytest.mark.parametrize("class_id", range(N_CLASSES))
def test_render_video_is_deterministic_per_seed(class_id: int) -> None:
    clip = world.render_video(class_id, _rng(11))
    assert clip.shape == (16, 64, 64, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, world.render_video(class_id, _rng(11)))
    assert not np.array_equal(clip, world.render_video(class_id, _rng(12)))
    assert world.render_video(class_id, _rng(11), frames=8, size=32).shape == (8, 32, 32, 3)


@pytest.mark.parametrize("pair", world.REVERSAL_PAIRS)
def test_second_class_of_a_pair_is_the_first_played_backwards(pair: tuple[int, int]) -> None:
    forward, backward = pair
    clip = world.render_video(backward, _rng(5))
    assert np.array_equal(clip, world.render_video(forward, _rng(5))[::-1])
    # Same frames, different order: the clip is not its own reversal.
    assert sorted(f.tobytes() for f in clip) == sorted(f.tobytes() for f in clip[::-1])
    assert not np.array_equal(clip, clip[::-1])


def _object_centroid(clip: np.ndarray) -> np.ndarray:
    """Per-frame (x, y) centroid of what differs from the temporal median (the moving object)."""
    diff = np.abs(clip.astype(float) - np.median(clip, axis=0)).sum(axis=-1)
    weights = np.where(diff > 60.0, diff, 0.0)
    ys, xs = np.mgrid[: clip.shape[1], : clip.shape[2]]
    total = weights.sum(axis=(1, 2))
    return np.stack([(weights * xs).sum(axis=(1, 2)) / total,
                     (weights * ys).sum(axis=(1, 2)) / total], axis=1)


@pytest.mark.parametrize("seed", range(4))
def test_motion_classes_move_the_way_their_names_say(seed: int) -> None:
    right = _object_centroid(world.render_video(0, _rng(seed)))
    assert right[-1, 0] - right[0, 0] > 20
    up = _object_centroid(world.render_video(2, _rng(seed)))
    assert up[0, 1] - up[-1, 1] > 20  # image y points down


@pytest.mark.parametrize("seed", range(4))
def test_colour_change_goes_from_red_to_blue(seed: int) -> None:
    clip = world.render_video(8, _rng(seed)).astype(float)
    changed = np.abs(clip[-1] - clip[0]).sum(axis=-1) > 150  # the object's pixels
    first, last = clip[0][changed].mean(axis=0), clip[-1][changed].mean(axis=0)
    assert first[0] > first[2] + 80 and last[2] > last[0] + 80


def test_wobbling_classes_differ_by_shape_and_rotate() -> None:
    triangle = world.render_video(10, _rng(2))
    assert not np.array_equal(triangle[0], triangle[4])
    assert world.WOBBLE_SHAPES == {10: "triangle", 11: "cross"}
    assert set(world.WOBBLE_SHAPES.values()).isdisjoint(world.MOTION_SHAPES)


# ----------------------------------------------------------------------------- dataset


def test_write_dataset_is_byte_identical_for_the_same_arguments(tmp_path: Path,
                                                                  dataset: Path) -> None:
    first = _digests(dataset)
    assert first == _digests(world.write_dataset(tmp_path / "b", 2, 1, seed=7))
    other = _digests(world.write_dataset(tmp_path / "c", 2, 1, seed=8))
    videos = [k for k in first if k.endswith(".mp4")]
    assert len(videos) == 3 * N_CLASSES and all(other[k] != first[k] for k in videos)


def test_labels_and_lists_parse_with_ids_in_range(dataset: Path) -> None:
    labels = _read_labels(dataset / "labels.csv")
    assert labels == dict(enumerate(world.CLASSES))
    base = _read_labels(dataset / "labels_base.csv")
    novel = _read_labels(dataset / "labels_novel.csv")
    assert list(base.values()) == [world.CLASSES[c] for c in world.BASE_CLASSES]
    assert list(novel.values()) == [world.CLASSES[c] for c in world.NOVEL_CLASSES]
    expectations = {  # list -> (label names by id, clips per class)
        "train.txt": (labels, 2), "test.txt": (labels, 1),
        "base_val.txt": (base, 1), "novel_val.txt": (novel, 1),
        **{f"few_shot_{k}.txt": (labels, min(k, 2)) for k in world.FEW_SHOT},
        **{f"base_train_s{s}.txt": (base, 2) for s in world.B2N_SEEDS},
    }
    for name, (names, per_class) in expectations.items():
        entries = _read_list(dataset / "lists" / name)
        assert len(entries) == per_class * len(names), name
        for rel, label in entries:
            assert label in names and (dataset / "videos" / rel).is_file()
            # The folder is the class slug, so the (renumbered) id must name that class.
            assert rel.split("/")[0] == world.class_slug(names[label]), (name, rel)
    train = set(_read_list(dataset / "lists" / "train.txt"))
    test = set(_read_list(dataset / "lists" / "test.txt"))
    assert train.isdisjoint(test)


def test_few_shot_lists_are_nested_draws_from_train(tmp_path: Path) -> None:
    root = world.write_dataset(tmp_path / "d", 17, 0, seed=1, frames=2, size=16)
    train = set(_read_list(root / "lists" / "train.txt"))
    shots = [set(_read_list(root / "lists" / f"few_shot_{k}.txt")) for k in world.FEW_SHOT]
    for k, chosen in zip(world.FEW_SHOT, shots):
        assert chosen <= train and len(chosen) == k * N_CLASSES
    assert all(a < b for a, b in zip(shots, shots[1:]))
    draws = [(root / "lists" / f"base_train_s{s}.txt").read_text() for s in world.B2N_SEEDS]
    assert len(set(draws)) == len(draws)
    entries = _read_list(root / "lists" / "base_train_s1.txt")
    assert len(entries) == world.B2N_SHOTS * len(world.BASE_CLASSES)


def test_manifest_declares_the_three_datasets(dataset: Path) -> None:
    manifest = tomllib.loads((dataset / "msta.toml").read_text())["datasets"]
    assert set(manifest) == {"world", "world-base", "world-novel"}
    assert set(manifest["world"]["lists"]) == {"train", "test", "few_shot_2", "few_shot_4",
                                               "few_shot_8", "few_shot_16"}
    assert set(manifest["world-base"]["lists"]) == {"train_s1", "train_s2", "train_s3", "val"}
    assert set(manifest["world-novel"]["lists"]) == {"val"}
    for entry in manifest.values():
        assert (dataset / entry["labels"]).is_file() and (dataset / entry["video_root"]).is_dir()
        assert all((dataset / rel).is_file() for rel in entry["lists"].values())
        assert entry["video"] == {"frames": 8, "train_short_side": 64, "test_short_side": 64,
                                  "crop_size": 64, "test_clips": 2, "test_crops": 1,
                                  "hflip": 0.0, "color_jitter": 0.0, "grayscale": 0.0}
    assert len((dataset / "README.txt").read_text().splitlines()) == 10


def test_videos_decode_with_pyav_and_decord_close_to_the_rendered_frames(dataset: Path) -> None:
    import av

    rel, label = _read_list(dataset / "lists" / "train.txt")[5]
    rendered = world.render_video(label, world.clip_rng(7, "train", label, int(Path(rel).stem)))
    with av.open(str(dataset / "videos" / rel)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert decoded.shape == rendered.shape
    assert np.abs(decoded.astype(float) - rendered).mean() < 10
    decord = pytest.importorskip("decord")
    reader = decord.VideoReader(str(dataset / "videos" / rel))
    assert len(reader) == 16
    assert np.array_equal(reader.get_batch(list(range(16))).asnumpy(), decoded)


def test_rgb_to_yuv420p_matches_the_bt601_reference() -> None:
    import av

    image = world.render_video(8, _rng(0))[3]
    ours = world.rgb_to_yuv420p(image).astype(int)
    swscale = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
    assert np.abs(ours - swscale.to_ndarray().astype(int)).mean() < 1.5
