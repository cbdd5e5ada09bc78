"""Class lists in every format users have, display names, malformed files, the real label files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cache.errors import UserError
from stages.formats.classlists import display_name, read_class_list
from stages.formats.datasets import Config


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_id_name_csv_quoted_and_unquoted(tmp_path: Path) -> None:
    classes = read_class_list(write(tmp_path, "l.csv", 'id,name\n0,"Pushing something, slowly"\n1,brush_hair\n'))
    assert [(c.class_id, c.raw_name, c.name) for c in classes] == [
        (0, "Pushing something, slowly", "pushing something, slowly"), (1, "brush_hair", "brush hair")]


def test_ssv2_labels_json_drops_brackets_and_orders_by_id(tmp_path: Path) -> None:
    data = {"Approaching [something] with your camera": "1", "Attaching [something] to [something]": "0"}
    classes = read_class_list(write(tmp_path, "labels.json", json.dumps(data)))
    assert [c.raw_name for c in classes] == ["Attaching something to something", "Approaching something with your camera"]


def test_ucf_class_ind_is_renumbered_from_zero(tmp_path: Path) -> None:
    classes = read_class_list(write(tmp_path, "classInd.txt", "1 ApplyEyeMakeup\n2 YoYo\n"))
    assert [(c.class_id, c.raw_name, c.name) for c in classes] == [(0, "ApplyEyeMakeup", "apply eye makeup"),
                                                                  (1, "YoYo", "yo yo")]


def test_plain_one_name_per_line(tmp_path: Path) -> None:
    classes = read_class_list(write(tmp_path, "names.txt", "waving\n\nclapping hands\n"))
    assert [(c.class_id, c.name) for c in classes] == [(0, "waving"), (1, "clapping hands")]


@pytest.mark.parametrize("raw,expected", [("ApplyEyeMakeup", "apply eye makeup"), ("brush_hair", "brush hair"),
                                          ("Approaching [something]", "approaching something"), ("TV", "TV"),
                                          ("abseiling", "abseiling")])
def test_display_names(raw: str, expected: str) -> None:
    assert display_name(raw) == expected


@pytest.mark.parametrize("text,needle", [
    ("id,name\n0,a\n2,b\n", "without gaps"),
    ("id,name\nzero,a\n", "line 2"),
    ("id,name\n0,a\n1,a\n", "more than once"),
    ("", "is empty"),
    ("{not json", "not valid JSON"),
])
def test_malformed_class_lists_name_the_file_and_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(UserError) as err:
        read_class_list(path)
    assert needle in str(err.value) and str(path) in str(err.value) and err.value.exit_code == 2


@pytest.mark.parametrize("name,count", [("ssv2_labels.csv", 174), ("hmdb_51_labels.csv", 51), ("ucf_101_labels.csv", 101),
                                        ("kinetics_400_labels.csv", 400), ("kinetics_600_labels.csv", 600),
                                        ("ssv2_174_base_labels.csv", 87), ("ZS_split1_K600.csv", 160)])
def test_real_label_files(shared_data: Path, name: str, count: int) -> None:
    classes = read_class_list(shared_data / "labels" / name)
    assert len(classes) == count and [c.class_id for c in classes] == list(range(count))


def test_dataset_without_class_list_says_which_flag_or_key_to_set() -> None:
    with pytest.raises(UserError) as err:
        Config(None).dataset("ssv2").require_labels()
    msg = str(err.value)
    assert "--labels" in msg and "[datasets.ssv2]" in msg and "labels.json" in msg and err.value.exit_code == 2


def test_config_datasets_halves_and_unknown_keys(tmp_path: Path, shared_data: Path) -> None:
    cfg = write(tmp_path, "msta.toml", f"""
[datasets.hmdb51]
labels = "{shared_data}/labels/hmdb_51_labels.csv"
base_labels = "{shared_data}/labels/hmdb_51_base_labels.csv"
novel_labels = "{shared_data}/labels/hmdb_51_novel_labels.csv"
video_root = "videos"
splits_dir = "{shared_data}/splits/hmdb_splits"
b2n_splits_dir = "{shared_data}/splits/base2novel_splits/hmdb_splits"
[datasets.hmdb51.video]
test_crops = 1
""")
    config = Config(cfg)
    ds = config.dataset("hmdb51")
    assert ds.video.test_clips == 10 and ds.video.test_crops == 1  # built-in default and override
    assert ds.video_root == (tmp_path / "videos").resolve()
    assert {"few_shot_2", "few_shot_16", "test", "test_3"} <= set(ds.lists)
    base = config.dataset("hmdb51-base")
    assert base.labels.name == "hmdb_51_base_labels.csv" and set(base.lists) >= {"train_s1", "train_s3", "val"}
    assert set(config.dataset("hmdb51-novel").lists) == {"val"}
    bad = write(tmp_path, "bad.toml", "[datasets.x]\nlabel = 'typo.csv'\n")
    with pytest.raises(UserError, match="unknown keys"):
        Config(bad).dataset("x")
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        Config(cfg).dataset("nope")


class CountingName(str):
    """A class name that counts the equality tests made on it."""
    comparisons = 0

    def __eq__(self, other: object) -> bool:
        CountingName.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_validation_is_linear_in_the_number_of_labels(tmp_path: Path) -> None:
    """list.count per name compared every name with every other: 100k labels took 104 s. The
    algorithm is asserted by counting comparisons, not by a clock (benchmarks/labels_scaling.py
    prints the time ratio)."""
    from stages.formats.classlists import _validated

    CountingName.comparisons = 0
    n = 2_000
    classes = _validated(tmp_path / "l.txt", [(i, CountingName(f"class {i}")) for i in range(n)])
    assert len(classes) == n and CountingName.comparisons < n  # the quadratic check made n * (n - 1)
    names = "".join(f"{i},class {i}\n" for i in range(100_000))
    assert len(read_class_list(write(tmp_path, "big.csv", "id,name\n" + names))) == 100_000
    with pytest.raises(UserError, match=r"more than once: \['class 5'\]"):
        read_class_list(write(tmp_path, "dup.csv", "id,name\n" + names + "100000,class 5\n"))


@pytest.mark.parametrize("text", ["id,name\n²,waving\n", '{"waving": "²"}', "² waving\n1 clapping\n"])
def test_ids_that_look_like_digits_but_are_not_integers(tmp_path: Path, text: str) -> None:
    """'²'.isdigit() is True, int('²') raises: such ids are refused with the file's name."""
    p = write(tmp_path, "l.json" if text.startswith("{") else "l.txt", text)
    if text.startswith("²"):  # not a classInd line: read as one name per line
        assert [c.raw_name for c in read_class_list(p)] == ["² waving", "1 clapping"]
        return
    with pytest.raises(UserError, match=str(p)):
        read_class_list(p)


def test_unreadable_class_lists_name_the_file(tmp_path: Path) -> None:
    """A directory, and JSON nested past the recursion limit: once an IsADirectoryError and a RecursionError."""
    for p in (tmp_path, write(tmp_path, "deep.json", '{"a":' + "[" * 100_000 + "]" * 100_000 + "}")):
        with pytest.raises(UserError, match=str(p)):
            read_class_list(p)


def test_raw_class_names_are_the_authors_prompts_on_ucf101(shared_data: Path) -> None:
    """ViFi-CLIP (and so the authors) fill the template with the raw class-list name; the CLIP
    tokenizer lowercases, so on UCF-101 77 of 101 prompts (42 of its 50 novel classes) differ from
    the display names', and on HMDB-51, SSv2 and K400 none do."""
    from stages.formats.classlists import read_class_list
    from stages.artifacts import prompt_names

    def differing(name: str) -> int:
        rows = [(c.class_id, c.raw_name, c.name) for c in read_class_list(shared_data / "labels" / name)]
        raw, display = prompt_names(rows, "raw"), prompt_names(rows, "display")
        assert display == [n for _, _, n in rows] and raw == [r for _, r, _ in rows]
        return sum(r.lower() != d.lower() for r, d in zip(raw, display))

    assert differing("ucf_101_labels.csv") == 77 and differing("ucf_101_novel_labels.csv") == 42
    assert differing("hmdb_51_labels.csv") == differing("ssv2_labels.csv") == differing("kinetics_400_labels.csv") == 0
