"""Canonical JSON and content digests: the vocabulary of stage keys and artifact identities."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any


def _normalise(value: Any) -> Any:
    """Make a value canonical: floats in repr form, tuples as lists, keys as strings."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"cannot key a non-finite float: {value!r}")
        # repr keeps 0.1 as 0.1 (json would too) and marks floats apart from ints in the key
        return {"__float__": repr(value)}
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot key a value of type {type(value).__name__}: {value!r}")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, floats in repr form: equal values give equal text."""
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def plain_json(value: Any) -> str:
    """The catalog's readable form of keyed params: sorted keys, numbers as JSON numbers (SQL reads
    `params->>'alpha'` as 0.0, not as the key's float marker)."""
    _normalise(value)  # refuses what a key refuses (NaN, objects)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_value(value: Any) -> str:
    return sha256_text(canonical_json(value))

