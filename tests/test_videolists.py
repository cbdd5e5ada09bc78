"""Video lists: the three formats, root containment, label checks, the few-shot draw, real B2N lists."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cache.errors import UserError
from stages.formats.classlists import read_class_list
from stages.formats.videolists import VideoItem, draw_per_class, missing_videos, read_video_list

NAMES = ["Pushing something from left to right", "Holding something"]


def test_vifi_pairs_ssv2_json_and_kinetics_csv(tmp_path: Path) -> None:
    pairs = tmp_path / "l.txt"
    pairs.write_text("a/x y.avi 1\nb.mp4 0\n")
    assert read_video_list(pairs, NAMES) == [VideoItem("a/x y.avi", 1), VideoItem("b.mp4", 0)]
    ssv2 = tmp_path / "validation.json"
    ssv2.write_text(json.dumps([{"id": "74225", "label": "holding a cup", "template": "Holding [something]",
                                 "placeholders": ["a cup"]}]))
    assert read_video_list(ssv2, NAMES) == [VideoItem("74225.webm", 1)]
    kin = tmp_path / "k.csv"
    kin.write_text("label,youtube_id,time_start,time_end,split\nholding something,abc,5,15,val\n")
    assert read_video_list(kin, NAMES) == [VideoItem("val/abc_000005_000015.mp4", 1)]


def test_bad_lists_are_refused_with_the_line(tmp_path: Path) -> None:
    p = tmp_path / "l.txt"
    p.write_text("a.mp4 0\nb.mp4\n")
    with pytest.raises(UserError, match="line 2"):
        read_video_list(p, NAMES)
    p.write_text("a.mp4 7\n")
    with pytest.raises(UserError, match="outside the class list"):
        read_video_list(p, NAMES)


def test_paths_outside_the_root_are_rejected_and_missing_counted(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    (root / "ok.mp4").write_bytes(b"x")
    (root / "loop.mp4").symlink_to(root / "loop.mp4")  # fails as a video, in frames; not missing
    missing = missing_videos([VideoItem("ok.mp4", 0), VideoItem("gone.mp4", 1), VideoItem("loop.mp4", 2)],
                             root, tmp_path / "l")
    assert missing == ["gone.mp4"]
    with pytest.raises(UserError, match="outside the video_root"):
        missing_videos([VideoItem("../secret.mp4", 0)], root, tmp_path / "l")


def test_few_shot_draw_is_reproducible_stratified_and_seed_dependent() -> None:
    items = [VideoItem(f"c{c}/v{i}.mp4", c) for c in range(3) for i in range(10)]
    a = draw_per_class(items, 4, 1, ["a", "b", "c"])
    assert a == draw_per_class(list(reversed(items)), 4, 1, ["a", "b", "c"])  # line order does not matter
    assert [sum(it.label == c for it in a) for c in range(3)] == [4, 4, 4]
    assert a != draw_per_class(items, 4, 2, ["a", "b", "c"])
    with pytest.raises(UserError, match="class 2 .* has only 1"):
        draw_per_class(items[:21], 2, 0, ["a", "b", "c"])


@pytest.mark.parametrize("ds,labels", [("ssv2", "ssv2_174"), ("hmdb", "hmdb_51"), ("ucf", "ucf_101"), ("k400", "kinetics_400")])
def test_real_base_to_novel_lists_use_their_half_ids(shared_data: Path, ds: str, labels: str) -> None:
    folder = shared_data / "splits" / "base2novel_splits" / f"{ds}_splits"
    base = [c.raw_name for c in read_class_list(shared_data / "labels" / f"{labels}_base_labels.csv")]
    novel = [c.raw_name for c in read_class_list(shared_data / "labels" / f"{labels}_novel_labels.csv")]
    train = read_video_list(folder / "fs_base_s1_train.txt", base)
    assert {it.label for it in train} == set(range(len(base)))
    assert all(sum(it.label == c for it in train) == 16 for c in range(len(base)))  # 16 shots per base class
    assert {it.label for it in read_video_list(folder / "novel_val.txt", novel)} == set(range(len(novel)))


def test_labels_outside_the_class_list_are_refused_by_line(tmp_path: Path) -> None:
    p = tmp_path / "l.txt"
    p.write_text("a.mp4 0\n\nc.mp4 1\nd.mp4 9\ne.mp4 -1\n")
    with pytest.raises(UserError, match=r"l.txt line 4: label 9 is outside .* \(2 such entries; none is used\)"):
        read_video_list(p, NAMES)


@pytest.mark.parametrize("data", [b"a.mp4 0\n\xff\xfe.mp4 1\n", "a.mp4 ²\n".encode(), b"[" * 100_000 + b"]" * 100_000])
def test_unreadable_lists_name_the_file(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "l.txt"
    p.write_bytes(data)
    with pytest.raises(UserError, match=str(p)):
        read_video_list(p, NAMES)


def test_a_negative_draw_is_refused() -> None:
    items = [VideoItem(f"{c}/{i}.mp4", c) for c in range(3) for i in range(4)]
    with pytest.raises(UserError, match="--shots must be at least 1"):
        draw_per_class(items, -2, 0, ["a", "b", "c"])  # once: every video of a class but the last two


def test_a_label_past_int64_is_refused_by_line(tmp_path: Path) -> None:
    p = tmp_path / "l.txt"
    p.write_text("a.mp4 0\nb.mp4 99999999999999999999999\n")
    with pytest.raises(UserError, match=r"line 2: label 99999999999999999999999 is outside"):
        read_video_list(p, NAMES)


def test_more_lines_than_a_chunk_keep_their_numbers_and_order(tmp_path: Path) -> None:
    """Lists are held as arrays built a chunk at a time: a repeat far down names both lines."""
    p = tmp_path / "l.txt"
    lines = [f"v{i}/é.mp4 {i % 2}" for i in range(20_000)]
    p.write_text("\n".join([*lines[:15_000], "", lines[3], *lines[15_000:]]) + "\n")
    with pytest.raises(UserError, match=r"line 15002: video v3/é.mp4 is listed again \(first at line 4\)"):
        read_video_list(p, NAMES)
    kept = read_video_list(p, NAMES, dedupe=True)
    assert len(kept) == 20_000 and kept[19_999] == kept[-1] == VideoItem("v19999/é.mp4", 1)
    assert list(kept[:2]) == [VideoItem("v0/é.mp4", 0), VideoItem("v1/é.mp4", 1)]


def test_without_drops_exactly_the_named_paths_in_order() -> None:
    from stages.formats.videolists import VideoList

    items = VideoList.of([VideoItem(f"v{i}.mp4", i % 3) for i in range(20_000)])
    kept = items.without([f"v{i}.mp4" for i in range(0, 20_000, 7)] + ["not-listed.mp4"])
    assert list(kept) == [VideoItem(f"v{i}.mp4", i % 3) for i in range(20_000) if i % 7]
    assert items.without([]) is items and len(items.without(items)) == 0


def test_the_draw_from_the_real_kinetics_list_is_the_one_earlier_versions_made(shared_data: Path) -> None:
    """Pinned: 8 videos per class, seed 1, from K400's real val list, as drawn by the Python-tuple
    implementation before lists became arrays (a changed draw would silently change every few-shot run)."""
    import hashlib

    names = [c.raw_name for c in read_class_list(shared_data / "labels" / "kinetics_400_labels.csv")]
    drawn = draw_per_class(read_video_list(shared_data / "splits" / "k400_splits" / "val.txt", names), 8, 1, names)
    assert len(drawn) == 3200 and drawn[0] == VideoItem("val/9eTXpQq9QTA_000126_000136.mp4", 0)
    text = "\n".join(f"{it.relpath} {it.label}" for it in drawn)
    assert hashlib.sha256(text.encode()).hexdigest() == "f155a5e8cb7ad5b34ea520b338d31360915cc318e0145730d583079265d658bb"


def test_an_id_that_is_not_valid_unicode_keeps_its_path(tmp_path: Path) -> None:
    """JSON may name any code point, a lone surrogate included: the path comes back as it was read."""
    ssv2 = tmp_path / "validation.json"
    ssv2.write_text('[{"id": "a\\udcff", "template": "Holding [something]"}]')
    assert read_video_list(ssv2, NAMES) == [VideoItem("a\udcff.webm", 1)]


def test_a_draw_refuses_labels_outside_the_class_list() -> None:
    with pytest.raises(UserError, match="outside the class list"):
        draw_per_class([VideoItem("a.mp4", -1)], None, 0, ["a"])
