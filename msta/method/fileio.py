"""Atomic file writes for the model package (checkpoints, adapters, cached clips)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write() on a full disk names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def safetensors_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a safetensors file's logical content: tensors by name, and metadata, in sorted order.

    The file bytes are not a stable identity: the writer stores the metadata map in hash order,
    which differs from one process to the next.
    """
    import hashlib
    import json

    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
