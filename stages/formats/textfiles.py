"""Reading the text files users hand in (class lists, video lists, JSON): every way such a file can
be unreadable ends in one UserError naming it (exit 2), never a traceback."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cache.errors import UserError

_INT = re.compile(r"-?[0-9]+")


def read_text(path: Path, what: str, hint: str = "") -> str:
    """The UTF-8 text of `path` (a BOM is dropped); `what` names the file in errors ("class list")."""
    tail = f"; expected {hint}" if hint else ""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist", 2) from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file{tail}", 2) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start}){tail}", 2) from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}", 2) from None


def parse_json(path: Path, raw: str, hint: str = "") -> Any:
    tail = f"; expected {hint}" if hint else ""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}){tail}", 2) from None
    except RecursionError:  # json recurses once per nesting level
        raise UserError(f"{path}: JSON nested too deeply{tail}", 2) from None


def is_int(text: str) -> bool:
    """An optionally negative run of ASCII digits: str.isdigit() also accepts '²', which int() refuses."""
    return _INT.fullmatch(text) is not None
