"""User-facing errors: the CLI prints the message (never a traceback) and exits with the code.
Every error text that reaches a table, a log or the terminal goes through `scrub`/`one_line`."""
from __future__ import annotations

import os
import re
from pathlib import Path


class UserError(Exception):
    """Bad input or environment the user can fix; `exit_code` 2 for usage, 1 for failed work."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Secrets seen at run time (an API key from the environment or a flag); scrub() masks them with
# the shapes below, so an error text is safe to store, log or print.
_SECRETS: set[str] = set()
_SECRET_SHAPES = (
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{4,}"), r"\1 ***"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), "sk-***"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@"), r"\1***@"),  # user:password@ in a URL
    (re.compile(r"(?i)\b(api[-_]?key|access[-_]?token|token|secret|password|sig|signature)=[^&\s'\"]+"), r"\1=***"),
)


def register_secret(value: str | None) -> None:
    """Mask `value` in every later scrub() (short values would mask ordinary words)."""
    if value and len(value) >= 6:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    """`text` without API keys, bearer tokens, sk-... keys or URL credentials."""
    secrets = set(_SECRETS)  # the environment's key is read each time: it may be set late
    env_key = os.environ.get("OPENAI_API_KEY", "")
    if len(env_key) >= 6:
        secrets.add(env_key)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    for pattern, repl in _SECRET_SHAPES:
        text = pattern.sub(repl, text)
    return text


# C0 controls but tab and newline, DEL, C1 controls, and the bidi overrides that reorder a line.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` safe to show on a terminal: control characters (an answer's ESC ] 0; ... BEL would
    retitle the window, a bare CR overwrite what was printed) shown escaped, e.g. `\\x1b`."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def one_line(text: str, limit: int = 500) -> str:
    """The first non-empty line of a (scrubbed) message: a stored traceback shows as its summary."""
    line = next((ln.strip() for ln in scrub(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_line(exc: BaseException) -> str:
    """One safe line for an exception: the message of a UserError, else its type, message and
    the innermost place it was raised (enough to find it, unlike a stored traceback)."""
    if isinstance(exc, UserError):
        return one_line(str(exc))
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" (at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
    return one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) + where
