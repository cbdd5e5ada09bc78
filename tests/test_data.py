"""The clip file format and the dataset/loader over it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from msta.video.clipstore import FORMATS, ClipStoreError, clip_shape, load_clip, save_clip
from msta.video.dataset import ClipDataset, ShardSampler, make_loader, set_loader_epoch

S, T, H, W = 2, 4, 48, 64
SIZE = 32


def smooth_clip(seed: int) -> np.ndarray:
    """Photo-like content (smooth gradients plus mild noise), for which JPEG is made."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([x * 3, y * 4, (x + y) * 2], axis=-1) + rng.integers(0, 60, 3)
    frames = base[None, None] + rng.normal(0, 3, (S, T, H, W, 3))
    return np.clip(frames, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    clip = smooth_clip(0)
    path = tmp_path / f"clip.{fmt}"
    written = save_clip(path, clip, fmt)
    assert written == path.stat().st_size
    back = load_clip(path)
    assert back.shape == clip.shape and back.dtype == np.uint8
    error = np.abs(back.astype(int) - clip.astype(int)).mean()
    assert error == 0 if fmt == "raw" else error < 3
    assert clip_shape(path) == clip.shape
    for index in range(S):
        np.testing.assert_array_equal(load_clip(path, index), back[index])
    with pytest.raises(IndexError):
        load_clip(path, S)


def test_jpeg_is_smaller_than_raw(tmp_path: Path) -> None:
    clip = smooth_clip(1)
    assert save_clip(tmp_path / "a", clip, "jpeg") < save_clip(tmp_path / "b", clip, "raw") / 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_partial_or_foreign_files_raise(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "clip"
    save_clip(path, smooth_clip(2), fmt)
    data = path.read_bytes()
    for cut in (0, 6, 40, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}"
        broken.write_bytes(data[:cut])
        with pytest.raises(ClipStoreError, match=str(broken)):
            load_clip(broken)
        with pytest.raises(ClipStoreError, match=str(broken)):
            load_clip(broken, 0)
        if cut < 40:  # the header itself is cut
            with pytest.raises(ClipStoreError, match=str(broken)):
                clip_shape(broken)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"PK\x03\x04 a zip file, not a clip" * 10)
    with pytest.raises(ClipStoreError, match="not a clip file"):
        load_clip(foreign)
    with pytest.raises(ClipStoreError, match="not a clip file"):
        clip_shape(foreign)


def test_save_rejects_wrong_arrays_and_formats(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_clip(tmp_path / "x", smooth_clip(0).astype(np.float32), "raw")
    with pytest.raises(ValueError):
        save_clip(tmp_path / "x", smooth_clip(0)[0], "raw")
    with pytest.raises(ValueError):
        save_clip(tmp_path / "x", smooth_clip(0), "png")
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "clip"
    old = smooth_clip(3)
    save_clip(path, old, "raw")
    save_clip(path, smooth_clip(4), "jpeg")  # replacing works and leaves no temp file
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_clip(path, old, "raw")
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]  # temp file removed
    assert load_clip(path).shape == old.shape  # the previous file is intact


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int]]:
    """10 cached clips; label i for clip i, so batches reveal which items they hold."""
    folder = tmp_path_factory.mktemp("cache")
    out = []
    for i in range(10):
        path = folder / f"{i}.clip"
        save_clip(path, smooth_clip(10 + i), FORMATS[i % 2])
        out.append((str(path), i))
    return out


def test_train_items_are_a_function_of_seed_epoch_index(items: list[tuple[str, int]]) -> None:
    a = ClipDataset(items, "train", SIZE, seed=1)
    b = ClipDataset(items, "train", SIZE, seed=1)
    clip, label = a[3]
    assert clip.shape == (T, 3, SIZE, SIZE) and clip.dtype == torch.float32 and label == 3
    for i in (5, 0, 9):  # other items in between do not matter
        b[i]
    assert torch.equal(clip, b[3][0])
    a.set_epoch(1)
    assert not torch.equal(clip, a[3][0])
    assert not torch.equal(clip, ClipDataset(items, "train", SIZE, seed=2)[3][0])


def test_train_picks_among_the_stored_samplings(tmp_path: Path) -> None:
    # Two stored samplings, one black and one white: both must be picked across epochs.
    clip = np.zeros((2, T, H, W, 3), np.uint8)
    clip[1] = 255
    save_clip(tmp_path / "c", clip, "raw")
    ds = ClipDataset([(str(tmp_path / "c"), 0)], "train", SIZE)
    picked = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        picked.add(ds[0][0].mean().item() > 0)
    assert picked == {True, False}


def test_test_items_and_batches(items: list[tuple[str, int]]) -> None:
    ds = ClipDataset(items, "test", SIZE, crops=3)
    views, label = ds[2]
    assert views.shape == (S * 3, T, 3, SIZE, SIZE) and label == 2
    batch, labels = next(iter(make_loader(ds, 4, shuffle=False, seed=0, epoch=0)))
    assert batch.shape == (4, S * 3, T, 3, SIZE, SIZE)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3]


def epoch_labels(loader: torch.utils.data.DataLoader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


def test_loader_is_deterministic_per_epoch_and_independent_of_workers(items: list[tuple[str, int]]) -> None:
    ds = ClipDataset(items, "train", SIZE, seed=5)
    serial = list(make_loader(ds, 4, shuffle=True, seed=5, epoch=2, workers=0))
    parallel = list(make_loader(ds, 4, shuffle=True, seed=5, epoch=2, workers=2))
    assert [x.shape for x, _ in serial] == [(4, T, 3, SIZE, SIZE)] * 2 + [(2, T, 3, SIZE, SIZE)]
    for (xa, ya), (xb, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sorted(y for _, ys in serial for y in ys.tolist()) == list(range(10))
    assert epoch_labels(make_loader(ds, 4, True, 5, epoch=3)) != epoch_labels(make_loader(ds, 4, True, 5, epoch=2))
    assert epoch_labels(make_loader(ds, 4, False, 5, epoch=3)) == list(range(10))


def test_a_loader_with_persistent_workers_draws_every_epochs_own_items(items: list[tuple[str, int]]) -> None:
    """Workers that live across epochs see the order and augmentations a fresh loader of that epoch
    gives, with `steps` cutting each epoch alike (the training loop keeps one loader per run)."""
    kept = make_loader(ClipDataset(items, "train", SIZE, seed=5), 4, shuffle=True, seed=5, epoch=0, workers=2,
                       steps=2, persistent=True)
    epochs = []
    for epoch in (0, 1, 2, 1):
        set_loader_epoch(kept, epoch)
        got = list(kept)
        fresh = list(make_loader(ClipDataset(items, "train", SIZE, seed=5), 4, shuffle=True, seed=5, epoch=epoch,
                                 workers=0, steps=2))
        assert len(got) == len(fresh) == 2
        for (xa, ya), (xb, yb) in zip(got, fresh, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        epochs.append(torch.cat([x for x, _ in got]))
    assert not torch.equal(epochs[0], epochs[1]) and torch.equal(epochs[1], epochs[3])


def test_loader_leaves_the_global_rng_alone(items: list[tuple[str, int]]) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(make_loader(ClipDataset(items, "train", SIZE), 4, True, 0, epoch=0, workers=1))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("n, world_size", [(10, 3), (10, 2), (2, 4), (7, 1)])
def test_shards_cover_the_data_with_equal_lengths(n: int, world_size: int) -> None:
    shards = [ShardSampler(n, True, 9, 1, rank, world_size).indices for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    everything = [i for s in shards for i in s]
    assert set(everything) == set(range(n))
    # Only the padding repeats items, and each repeat once.
    assert len(everything) - n == (-n) % world_size
    dropped = [ShardSampler(n, True, 9, 1, rank, world_size, drop_last=True).indices for rank in range(world_size)]
    flat = [i for s in dropped for i in s]
    assert len(set(flat)) == len(flat) == n - n % world_size


def test_ranks_get_the_same_number_of_batches(items: list[tuple[str, int]]) -> None:
    ds = ClipDataset(items, "test", SIZE, crops=1)
    for drop_last in (False, True):
        loaders = [make_loader(ds, 2, True, 0, 0, rank=r, world_size=3, drop_last=drop_last) for r in range(3)]
        assert len({len(loader) for loader in loaders}) == 1
        labels = [epoch_labels(loader) for loader in loaders]
        assert len({len(x) for x in labels}) == 1
        if drop_last:
            flat = [y for x in labels for y in x]
            assert len(flat) == len(set(flat))
