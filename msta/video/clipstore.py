"""The on-disk format of one cached clip: uint8 frames (S, T, H, W, 3) in one file.

raw:  an uncompressed .npy file; the fastest to read, ~H*W*3 bytes per frame.
jpeg: every frame JPEG-compressed (Pillow, quality 90), packed after a small header:
      magic, shape (S, T, H, W) as uint32, the end offset of each frame as uint64 (relative to
      the first frame), all little-endian.
The format is recognised from the first bytes of the file, so readers need no parameter.
Writes are atomic (temp file in the destination folder, fsync, os.replace): a reader sees
either the whole old file, the whole new file, or no file.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from msta.fileio import atomic_write_bytes

FORMATS = ("raw", "jpeg")
# Measured by benchmarks/frames_loader.py (T=8, M=2, short side 256): a jpeg clip is ~14x
# smaller than raw (~0.3 MB vs 4.2 MB, i.e. ~70 GB vs ~1 TB for Kinetics-400's 240k videos),
# and training batches come only ~5-10% slower from it than from raw: the ~4x slower load
# is small next to the augmentations, and a training step decodes only the T frames it uses.
# Raw stays available for small sets on fast local disks.
DEFAULT_FORMAT = "jpeg"
JPEG_QUALITY = 90

_NPY_MAGIC = b"\x93NUMPY"
_JPEG_MAGIC = b"MSTAJPG1"
_SHAPE = np.dtype("<u4")
_OFFSET = np.dtype("<u8")
_JPEG_FIXED = len(_JPEG_MAGIC) + 4 * _SHAPE.itemsize  # magic and shape, before the frame index


class ClipStoreError(Exception):
    """A cached clip file that is corrupt, partial or not a clip file at all."""


ALTERED = "cached clip altered: "  # the message's prefix; the path follows (a DataLoader re-raise keeps the text)


class ClipAltered(ClipStoreError):
    """A cached clip whose bytes are not the ones registered for it."""


def save_clip(path: str | os.PathLike[str], frames: np.ndarray, fmt: str = DEFAULT_FORMAT) -> int:
    """Atomically write uint8 frames (S, T, H, W, 3) to `path`; return the bytes written."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (S, T, H, W, 3), got {frames.dtype} {frames.shape}")
    data = _encode_raw(frames) if fmt == "raw" else _encode_jpeg(frames)
    atomic_write_bytes(path, data)
    return len(data)


def load_clip(path: str | os.PathLike[str], index: int | None = None, frames: Sequence[int] | None = None,
              sha256: str | None = None) -> np.ndarray:
    """Read a clip written by `save_clip`, whatever its format: all of it as uint8
    (S, T, H, W, 3), or only stored clip `index` as (T, H, W, 3) (a jpeg file then decodes only
    those T frames, which is what a training step needs), or only its `frames` (a frame pool's
    draw for one epoch) as (len(frames), H, W, 3).

    With `sha256`, the bytes read (the whole file is read anyway) must have that digest, else
    ClipAltered: an altered clip is never used, and no pass over the data is needed to know it.
    Raises ClipStoreError for a corrupt or partial file; a missing file raises the usual OSError.
    """
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ClipAltered(f"{ALTERED}{path}")
    if not data.startswith((_NPY_MAGIC, _JPEG_MAGIC)):
        raise ClipStoreError(f"{path}: not a clip file (header {data[:8]!r})")
    try:
        if data.startswith(_JPEG_MAGIC):
            return _decode_jpeg(data, index, frames)
        stored = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # numpy and Pillow on short or damaged bytes
        raise ClipStoreError(f"{path}: corrupt or partial clip file ({e})") from e
    if stored.dtype != np.uint8 or stored.ndim != 5 or stored.shape[-1] != 3:
        raise ClipStoreError(f"{path}: not a clip (array {stored.dtype} {stored.shape})")
    if index is None:
        return stored
    clip = stored[_checked(index, len(stored))]
    return clip if frames is None else clip[_checked_frames(frames, clip.shape[0])]


def clip_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """(S, T, H, W, 3) of a clip file, from its header alone."""
    with open(path, "rb") as f:
        head = f.read(_JPEG_FIXED)
        try:
            if head.startswith(_NPY_MAGIC):
                f.seek(0)
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                return tuple(read_header(f)[0])
            if head.startswith(_JPEG_MAGIC):
                return (*_jpeg_dims(head), 3)
        except ValueError as e:
            raise ClipStoreError(f"{path}: corrupt or partial clip file ({e})") from e
    raise ClipStoreError(f"{path}: not a clip file (header {head[:8]!r})")


def _checked_frames(frames: Sequence[int], count: int) -> list[int]:
    picked = [int(f) for f in frames]
    if picked and not (0 <= min(picked) and max(picked) < count):
        raise IndexError(f"frames {min(picked)}..{max(picked)} out of range: the clip holds {count} frames")
    return picked


def _checked(index: int, count: int) -> int:
    if not 0 <= index < count:
        raise IndexError(f"clip index {index} out of range: the file holds {count} clips")
    return index


def _encode_raw(frames: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(frames), allow_pickle=False)
    return buffer.getvalue()


def _encode_jpeg(frames: np.ndarray) -> bytes:
    S, T, H, W = frames.shape[:4]
    blobs = []
    for frame in frames.reshape(S * T, H, W, 3):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        blobs.append(buffer.getvalue())
    ends = np.cumsum([len(b) for b in blobs], dtype=np.uint64)
    header = _JPEG_MAGIC + np.array([S, T, H, W], _SHAPE).tobytes() + ends.astype(_OFFSET).tobytes()
    return header + b"".join(blobs)


def _jpeg_dims(data: bytes) -> tuple[int, int, int, int]:
    if len(data) < _JPEG_FIXED:
        raise ValueError("header cut short")
    S, T, H, W = (int(v) for v in np.frombuffer(data, _SHAPE, 4, len(_JPEG_MAGIC)))
    return S, T, H, W


def _decode_jpeg(data: bytes, index: int | None, frames: Sequence[int] | None = None) -> np.ndarray:
    """Inverse of `_encode_jpeg`, for all clips, clip `index`, or some `frames` of it; ValueError
    when the bytes do not add up to a whole file."""
    S, T, H, W = _jpeg_dims(data)
    start = _JPEG_FIXED + S * T * _OFFSET.itemsize
    if S * T == 0 or len(data) < start:
        raise ValueError("frame index cut short")
    ends = np.frombuffer(data, _OFFSET, S * T, _JPEG_FIXED).astype(np.int64) + start
    if len(data) != ends[-1]:
        raise ValueError(f"{len(data)} bytes, the index promises {ends[-1]}")
    begins = np.concatenate([[start], ends[:-1]])
    if index is None:
        picked = list(range(S * T))
    else:
        first = _checked(index, S) * T
        picked = [first + f for f in (range(T) if frames is None else _checked_frames(frames, T))]
    out = np.empty((len(picked), H, W, 3), np.uint8)
    for i, f in enumerate(picked):
        with Image.open(io.BytesIO(data[begins[f] : ends[f]])) as image:
            if image.format != "JPEG" or image.mode != "RGB" or image.size != (W, H):
                raise ValueError(f"frame {f} is {image.format} {image.mode} {image.size}, expected RGB JPEG {(W, H)}")
            out[i] = np.asarray(image)
    return out.reshape(S, T, H, W, 3) if index is None else out
