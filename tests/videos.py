"""Write small test videos with PyAV, in the containers and codecs of the real datasets.

Every frame carries its own index as 8 binary bars in its top half (white = 1, black = 0,
most significant bit left) so a decoded frame can be identified after lossy coding and
resizing; the bottom half is pure red, which pins the RGB channel order.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

BITS = 8

# (container suffix, codec, pixel format, encoder options): the formats of SSv2 (webm/VP9),
# Kinetics (mp4/H.264, with B-frames so that decode order != presentation order) and
# HMDB/UCF (AVI with MPEG-4 part 2 or MJPEG).
FORMATS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "mp4": (".mp4", "libx264", "yuv420p", {"preset": "veryfast", "crf": "18", "bf": "2"}),
    "webm": (".webm", "libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}),
    "avi": (".avi", "mpeg4", "yuv420p", {"qscale": "2"}),
    "mjpeg": (".avi", "mjpeg", "yuvj420p", {}),
}


def frame_image(index: int, width: int, height: int) -> np.ndarray:
    """The RGB uint8 image of frame `index`: index bits as bars on top, red below."""
    img = np.zeros((height, width, 3), np.uint8)
    top = height // 2
    edges = np.linspace(0, width, BITS + 1).astype(int)
    for b in range(BITS):
        if (index >> (BITS - 1 - b)) & 1:
            img[:top, edges[b] : edges[b + 1]] = 255
    img[top:, :, 0] = 255
    return img


def read_index(frame: np.ndarray) -> int:
    """Recover the index written by `frame_image` from a decoded (possibly resized) frame."""
    height, width = frame.shape[:2]
    edges = np.linspace(0, width, BITS + 1)
    # Sample the middle of each bar, away from edges blurred by coding and resizing.
    rows = slice(height // 8, 3 * height // 8)
    index = 0
    for b in range(BITS):
        lo, hi = edges[b], edges[b + 1]
        cols = slice(int(lo + (hi - lo) / 4), int(hi - (hi - lo) / 4))
        bit = frame[rows, cols].mean() > 127
        index = (index << 1) | int(bit)
    return index


def write_video(
    path: str | os.PathLike[str],
    num_frames: int,
    width: int = 160,
    height: int = 120,
    fmt: str = "mp4",
    fps: int = 25,
    faststart: bool = False,
) -> Path:
    """Write a video of `num_frames` indexed frames; `faststart` puts the mp4 index first."""
    suffix, codec, pix_fmt, options = FORMATS[fmt]
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{fmt} videos need a {suffix} suffix, got {path.name}")
    container_options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=container_options) as container:
        stream = container.add_stream(codec, rate=fps, options=dict(options))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_truncated(src: str | os.PathLike[str], dst: str | os.PathLike[str], fraction: float = 0.5) -> Path:
    """Copy the first `fraction` of the bytes of `src` to `dst`, like an interrupted download."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def write_garbled(src: str | os.PathLike[str], dst: str | os.PathLike[str], count: int = 200, seed: int = 0) -> Path:
    """Copy `src` with `count` random bytes of its middle half overwritten: the container is
    intact, the coded frames are damaged (a bad disk sector, a broken transfer)."""
    data = bytearray(Path(src).read_bytes())
    rng = np.random.default_rng(seed)
    for i in rng.integers(len(data) // 4, 3 * len(data) // 4, count):
        data[i] = rng.integers(256)
    dst = Path(dst)
    dst.write_bytes(bytes(data))
    return dst


def write_zero_byte(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_text_as_video(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.write_text("<html><body>403 Forbidden</body></html>\n" * 20)
    return path


def write_audio_only(path: str | os.PathLike[str], seconds: float = 0.5, rate: int = 8000) -> Path:
    """A valid media file without a video stream (a WAV tone)."""
    path = Path(path)
    samples = (np.sin(np.arange(int(seconds * rate)) * 0.1) * 8000).astype(np.int16)[None, :]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
