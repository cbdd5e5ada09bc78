"""Video decoding and frame sampling: one video in, uint8 RGB frames (S, T, H, W, 3) out.

Two decoders, decord (fast random access) and PyAV (everywhere, including platforms where
decord has no wheel), pick the same frame indices and return the same shapes. Every file is
first checked with PyAV at the container level, because PyAV raises clean Python errors on
inputs that make decord misbehave: decord silently returns a shortened video for a truncated
AVI or WebM (it stops where the bytes stop), so the check compares what is present with what
the header promises.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import av
import numpy as np
from PIL import Image

DECODERS = ("decord", "pyav")
MODES = ("train", "test")

# A video counts as truncated when more than this many frames (or frame durations), or this
# fraction of them, are missing from what its header promises: headers are often off by one.
_MISSING_FRAMES = 2
_MISSING_FRACTION = 0.02

# First bytes of the containers the action-recognition datasets use (MP4/MOV, Matroska/WebM,
# AVI, FLV, MPEG-PS). A file that starts like one of these but will not open is damaged, not
# something else; this only chooses the wording of the error.
_CONTAINER_MAGIC = (b"\x1a\x45\xdf\xa3", b"RIFF", b"FLV", b"\x00\x00\x01\xba")
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
_DECORD_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


class VideoError(Exception):
    """A video file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


@dataclass(frozen=True)
class Sampling:
    """How frames are picked from one video and at what size they are stored.

    train: `samplings` independent TSN draws of `frames` frames (S = samplings), or with `pool`
           a frame pool (S = 1): up to `pool` evenly spaced frames of the video (all of a shorter
           one), from which the loader draws new TSN offsets every epoch, as the authors' runs did;
    test: `clips` temporal views of `frames` frames (S = clips), evenly spaced (`offsets` "even",
          deterministic) or each drawn with the training sampler's random offsets, seeded by
          (seed, video) (`offsets` "random": ViFi-CLIP's multi-clip test views, the authors').
    """

    mode: str
    frames: int = 8
    samplings: int = 2
    clips: int = 1
    short_side: int = 256
    seed: int = 0
    pool: int = 0
    offsets: str = "even"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Sampling.mode must be one of {MODES}, got {self.mode!r}")
        if self.offsets not in ("even", "random"):
            raise ValueError(f"Sampling.offsets must be even or random, got {self.offsets!r}")
        for name in ("frames", "samplings", "clips", "short_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Sampling.{name} must be a positive int, got {value!r}")
        for name in ("seed", "pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Sampling.{name} must be a non-negative int, got {value!r}")

    @property
    def num_clips(self) -> int:
        """S: how many (T, H, W, 3) clips one video yields."""
        if self.mode == "test":
            return self.clips
        return 1 if self.pool else self.samplings

    def to_dict(self) -> dict[str, Any]:
        """The parameters that change the output, and only those, for cache keys: test
        sampling is deterministic, so `seed` and `samplings` do not enter it; `clips` does
        not enter train sampling; a pool is deterministic too; no pool leaves the keys as before."""
        params = asdict(self)
        if self.mode == "test" and self.offsets == "random":
            unused: tuple[str, ...] = ("samplings", "pool")
        elif self.mode == "test":
            unused = ("samplings", "seed", "pool", "offsets")
        elif self.pool:
            unused = ("clips", "samplings", "seed", "offsets")
        else:
            unused = ("clips", "pool", "offsets")
        return {k: v for k, v in sorted(params.items()) if k not in unused}


def train_indices(num_frames: int, T: int, rng: np.random.Generator) -> np.ndarray:
    """TSN sampling: split [0, num_frames) into T equal segments, one random frame in each.

    Segment t is [floor(t * n / T), floor((t + 1) * n / T)), so every frame belongs to exactly
    one segment (mmaction's integer `avg_interval` instead never samples the tail, e.g. frames
    8-14 of a 15-frame video with T = 8). When num_frames < T some segments are empty and take
    the frame at their start, so frames repeat in order, as in mmaction's and ViFi-CLIP's
    `avg_interval == 0` branch (which rounds where this floors).
    """
    _check_count(num_frames, T)
    bounds = np.arange(T + 1) * num_frames // T
    lo = bounds[:-1]
    width = np.maximum(bounds[1:] - lo, 1)
    return np.minimum(lo + rng.integers(0, width), num_frames - 1)


def even_indices(num_frames: int, T: int, clips: int) -> np.ndarray:
    """Deterministic test views (clips, T): T segments, clip k takes the point at fraction
    (k + 1/2) / clips of each segment. One clip gives the segment centres (mmaction's test
    mode); two give the quarter points (mmaction's `twice_sample`, made symmetric); in general
    the clips are evenly spaced in time and together cover the video. (X-CLIP and ViFi-CLIP draw
    multi-clip test views at random instead; deterministic views make evaluation repeatable.)
    """
    _check_count(num_frames, T)
    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips}")
    segment = num_frames / T
    offsets = (np.arange(clips)[:, None] + 0.5) / clips * segment
    positions = np.arange(T)[None, :] * segment + offsets
    return np.minimum(positions.astype(np.int64), num_frames - 1)


def pool_indices(num_frames: int, pool: int) -> np.ndarray:
    """Up to `pool` evenly spaced frame indices, every frame of a video of at most `pool` frames."""
    count = min(num_frames, pool)
    return ((np.arange(count) + 0.5) * num_frames / count).astype(np.int64)


def sample_indices(num_frames: int, sampling: Sampling, key: str = "") -> np.ndarray:
    """The (S, T) frame indices `sampling` picks from a video of `num_frames` frames; train
    draws come from a generator seeded by (sampling.seed, key), so they are reproducible."""
    if sampling.mode == "test" and sampling.offsets == "even":
        return even_indices(num_frames, sampling.frames, sampling.clips)
    if sampling.pool:
        return pool_indices(num_frames, sampling.pool)[None]
    rng = np.random.default_rng([sampling.seed, _key_entropy(key)])
    draws = sampling.clips if sampling.mode == "test" else sampling.samplings
    return np.stack([train_indices(num_frames, sampling.frames, rng) for _ in range(draws)])


def probe(path: str | os.PathLike[str], decoder: str = "decord") -> VideoInfo:
    """Validate a video and describe it; `num_frames` is the count `decoder` will index."""
    _check_decoder(decoder)
    info = _inspect(str(path))
    if decoder == "pyav":
        return info
    reader = _open_decord(str(path))
    return replace(info, num_frames=len(reader), fps=float(reader.get_avg_fps()))


def decode_clip(
    path: str | os.PathLike[str], sampling: Sampling, decoder: str = "decord", key: str = ""
) -> np.ndarray:
    """Decode the frames `sampling` picks as uint8 RGB (S, T, H, W, 3).

    Frames are resized so that the short side is exactly `sampling.short_side`, aspect kept,
    with antialiased bilinear filtering. Small videos are upscaled too, so that every stored
    clip can be cropped to the training size. `key` is a stable identity of the video (e.g. its
    path in the dataset): the same (video, sampling, key) always gives the same frames.
    """
    _check_decoder(decoder)
    path = str(path)
    info = _inspect(path)
    if decoder == "decord":
        reader = _open_decord(path)
        indices = sample_indices(_nonempty(path, len(reader)), sampling, key)
        wanted, inverse = np.unique(indices, return_inverse=True)
        frames = _decord_frames(reader, wanted, path)
    else:
        indices = sample_indices(_nonempty(path, info.num_frames), sampling, key)
        wanted, inverse = np.unique(indices, return_inverse=True)
        frames = _pyav_frames(path, wanted)
    frames = resize_short_side(frames, sampling.short_side)
    return frames[inverse.reshape(-1)].reshape(*indices.shape, *frames.shape[1:])


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    """Resize uint8 (N, H, W, 3) frames so min(H, W) == short_side, aspect kept."""
    height, width = frames.shape[1:3]
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return frames
    # PIL's bilinear widens its kernel when shrinking, i.e. it antialiases.
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames])


def _check_count(num_frames: int, T: int) -> None:
    if num_frames < 1 or T < 1:
        raise ValueError(f"need num_frames >= 1 and T >= 1, got {num_frames} and {T}")


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")


def _key_entropy(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:16], "little")


def _nonempty(path: str, num_frames: int) -> int:
    if num_frames < 1:
        raise VideoError(f"{path}: has only {num_frames} frames")
    return num_frames


def _inspect(path: str) -> VideoInfo:
    """Open with PyAV and read every video packet (no decoding): catches the inputs that are
    empty, not a video, without a video stream, or cut short, each with its own message."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        raise VideoError(f"{path}: cannot read file ({e.strerror or e})") from e
    if not head:
        raise VideoError(f"{path}: zero-length file")
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise VideoError(f"{path}: {_unopenable(head)} ({e})") from e
    with container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        present, end = _count_packets(container, stream, path)
        _check_complete(path, container, stream, present, end)
        fps = stream.average_rate or stream.guessed_rate or 0
        return VideoInfo(present, float(fps), stream.codec_context.width, stream.codec_context.height)


def _unopenable(head: bytes) -> str:
    if head[4:8] in _MP4_BOXES or head.startswith(_CONTAINER_MAGIC):
        return "truncated or corrupt (a video container that FFmpeg cannot open)"
    return "not a video (FFmpeg does not recognise the format)"


def _count_packets(container: Any, stream: Any, path: str) -> tuple[int, float]:
    """(number of video packets, end time in seconds of the last one)."""
    count, end = 0, 0.0
    try:
        for packet in container.demux(stream):
            if not packet.size:  # the demuxer's final flush packet
                continue
            count += 1
            if packet.pts is not None:
                end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    except av.FFmpegError as e:
        raise VideoError(f"{path}: truncated or corrupt ({e})") from e
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return count, end - start


def _check_complete(path: str, container: Any, stream: Any, present: int, end: float) -> None:
    """Compare what is present with the header: the frame count where the container stores one
    (MP4, AVI), else the container duration (Matroska/WebM stores only that)."""
    if stream.frames > 0:
        if stream.frames - present > max(_MISSING_FRAMES, _MISSING_FRACTION * stream.frames):
            raise VideoError(
                f"{path}: truncated or corrupt (header says {stream.frames} frames, {present} present)"
            )
    elif container.duration and present:
        expected = container.duration / av.time_base
        frame_time = end / present
        if expected - end > max(_MISSING_FRAMES * frame_time, _MISSING_FRACTION * expected):
            raise VideoError(f"{path}: truncated or corrupt (video ends at {end:.2f} s of {expected:.2f} s)")


def _open_decord(path: str) -> Any:
    try:
        import decord
    except ImportError as e:
        raise ImportError("decord is not installed (it has no wheel for this platform): use decoder='pyav'") from e
    try:
        # One thread: parallelism comes from processes (DataLoader workers, sharded extraction).
        return decord.VideoReader(path, num_threads=1)
    except Exception as e:  # decord raises RuntimeError or its own DECORDError
        raise VideoError(f"{path}: truncated or corrupt (decord: {_decord_message(e)})") from e


def _decord_frames(reader: Any, wanted: np.ndarray, path: str) -> np.ndarray:
    try:
        return reader.get_batch(wanted.tolist()).asnumpy()
    except Exception as e:
        raise VideoError(f"{path}: truncated or corrupt (decord: {_decord_message(e)})") from e


def _pyav_frames(path: str, wanted: np.ndarray) -> np.ndarray:
    """Decode sequentially up to the last wanted frame: seeking in PyAV lands on keyframes
    whose frame number is not reliably known, so counting decoded frames is the only exact way."""
    needed = set(wanted.tolist())
    last = int(wanted[-1])
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            for decoded, frame in enumerate(container.decode(stream), start=1):
                index = decoded - 1
                if index in needed:
                    frames[index] = frame.to_ndarray(format="rgb24")
                if index == last:
                    break
    except av.FFmpegError as e:
        raise VideoError(f"{path}: truncated or corrupt after {decoded} frames ({e})") from e
    if len(frames) < len(needed):
        raise VideoError(f"{path}: has only {decoded} frames, frame {last} requested")
    return np.stack([frames[i] for i in wanted.tolist()])


def _decord_message(e: BaseException) -> str:
    """decord's message without its log prefixes ("[12:00:00] src/file.cc:42: ") and stack trace."""
    lines = str(e).strip().splitlines()
    return _DECORD_LOG_PREFIX.sub("", lines[0]) if lines else type(e).__name__
