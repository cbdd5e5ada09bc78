"""The LLM prompts (Jinja2) and the sentence frames that turn an LLM phrase into CLIP text.

A user may copy this folder, edit it, and pass `--prompt-dir`; the files' contents are inputs
of the describe stage's key, so an edit makes exactly the affected descriptions stale.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROMPT_DIR = Path(__file__).parent
KINDS = ("spatial", "temporal")


def template_files(prompt_dir: Path, kind: str) -> dict[str, Path]:
    """The files one kind's requests depend on, by input name."""
    return {"template:system": prompt_dir / "system.j2",
            f"template:{kind}": prompt_dir / f"{kind}.j2",
            "template:reask": prompt_dir / "reask.j2",
            # "frames" here means sentence frames. The file and input names stay as they were: they
            # are part of every describe key and of users' --prompt-dir folders.
            "template:frames": prompt_dir / "frames.toml"}


def load_sentence_frames(path: Path) -> dict[str, str]:
    """The sentence frames by kind; ValueError naming the file when one cannot serve."""
    try:
        sentence_frames = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid TOML ({exc})") from None
    for kind in KINDS:
        sentence_frame = sentence_frames.get(kind)
        if not isinstance(sentence_frame, str) or "{phrase}" not in sentence_frame:
            raise ValueError(f"{path}: `{kind}` must be a sentence frame containing {{phrase}}")
        try:
            sentence_frame.format(phrase="", class_name="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{path}: `{kind}` may use only {{phrase}} and {{class_name}} in braces "
                             f"(write {{{{ and }}}} for literal braces): {type(exc).__name__}: {exc}") from None
    return {k: sentence_frames[k] for k in KINDS}


def sentence_pattern(sentence_frame: str) -> re.Pattern[str]:
    """A regex that recovers {phrase} (and {class_name}) from a sentence built with `frame`."""
    parts = re.split(r"(\{phrase\}|\{class_name\})", sentence_frame)
    rx = "".join({"{phrase}": r"(?P<phrase>.+?)", "{class_name}": r"(?P<class_name>.+?)"}.get(p, re.escape(p))
                 for p in parts)
    return re.compile(rf"^{rx}$", re.IGNORECASE | re.DOTALL)
