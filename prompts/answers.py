"""Turning LLM answers and imported files into clean descriptions, or into reasons why not.

A *fatal* problem (not JSON, wrong count, empty, not a string, a mere echo of the class name,
a sentence over CLIP's context) makes an LLM answer unusable: the client asks again. Imported
files cannot be asked again, so there fatal problems leave the class out, and the softer
defects of real files (typos, template drift, parentheses) are kept beside the row in
`problems`, never hidden.

Answers come from endpoints that may be hostile: every check here takes time linear in the
answer (no regular expression that backtracks over it; CLIP's tokenizer, quadratic in a word's
length, sees no phrase over MAX_PHRASE_CHARS), and JSON nested past Python's recursion limit is
an answer that is not JSON like any other.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prompts import sentence_pattern

_FENCE_OPEN = re.compile(r"```[a-zA-Z]*")
_NUMBERING = re.compile(r"^\s*(?:\(?\d+[\.\):]|[-*\u2022])\s+")
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"
_SENTENCE_BREAK = re.compile(r"[.!?]\s+(?=\S)")
_VIDEOS_TYPO = re.compile(r"^(an?\s+)videos\b", re.IGNORECASE)

TokenCounter = Callable[[Sequence[str]], list[int]]
# Far over CLIP's context (a phrase should be under 12 words); counting the tokens of a 100 kB
# word took 92 s.
MAX_PHRASE_CHARS = 1000
_NOT_JSON = object()


@dataclass
class Description:
    phrase: str
    text: str
    n_tokens: int
    problems: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    descriptions: list[Description]
    fatal: list[str]

    @property
    def ok(self) -> bool:
        return not self.fatal


def clean_phrase(raw: str) -> tuple[str, list[str]]:
    """Strip numbering, bullets, quotes, wrapping brackets and a final period; say what was stripped."""
    notes = []
    text = re.sub(r"\s+", " ", raw).strip()
    stripped = _NUMBERING.sub("", text)
    if stripped != text:
        notes.append("numbering stripped")
    text = stripped.strip().strip(_QUOTES).strip()
    if len(text) >= 2 and text[0] in "([{" and text[-1] in ")]}":
        text = text[1:-1].strip()
        notes.append("parentheses stripped")
    text = text.rstrip(" .").strip(_QUOTES).strip()
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and (len(first) == 1 or first[1:].islower()):
        text = text[0].lower() + text[1:]  # it continues a sentence frame; acronyms stay
    return text, notes


def _same_as_class(phrase: str, class_name: str) -> bool:
    norm = lambda s: re.sub(r"[^a-z0-9]", "", re.sub(r"^(a|an|the)\s+", "", s.lower()))
    return norm(phrase) == norm(class_name)


def _unfence(text: str) -> str:
    """`text` (stripped) without a Markdown code fence around it: ```json ... ```."""
    opening = _FENCE_OPEN.match(text)
    if opening:
        text = text[opening.end():].lstrip()
    return text[:-3].rstrip() if text.endswith("```") else text


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's limit, [[[[...]]]]
        return _NOT_JSON


def parse_answer(content: str | None, n: int) -> tuple[list[str] | None, list[str]]:
    """The list of raw phrase strings in an answer, or None with the reasons."""
    if not content or not content.strip():
        return None, ["the answer is empty"]
    text = _unfence(content.strip())
    data = _loads(text)
    if data is _NOT_JSON:  # perhaps an object in prose: try from its first { to the last }
        start, end = text.find("{"), text.rfind("}")
        data = _loads(text[start:end + 1]) if 0 <= start < end else _NOT_JSON
        if data is _NOT_JSON:
            return None, [f"the answer is not JSON (it starts {text[:60]!r})"]
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        items = data.get("descriptions", lists[0] if len(lists) == 1 else None)
    else:
        items = data
    if not isinstance(items, list):
        return None, ['the JSON has no list under "descriptions"']
    bad = [f"item {i + 1} is {type(x).__name__}, not a string" for i, x in enumerate(items)
           if not isinstance(x, str)]
    if bad:
        return None, bad[:3]
    return items, []


def validate_phrases(items: Sequence[str], n: int, class_name: str, sentence_frame: str,
                     count_tokens: TokenCounter, context_length: int) -> Verdict:
    """An LLM answer's phrases against the rules; wraps clean ones in the sentence frame."""
    fatal: list[str] = []
    if len(items) != n:
        fatal.append(f"expected exactly {n} phrases, got {len(items)}")
    cleaned = [clean_phrase(x) for x in items]
    phrases = [p for p, _ in cleaned]
    for i, p in enumerate(phrases):
        if not p:
            fatal.append(f"phrase {i + 1} is empty")
        elif _same_as_class(p, class_name):
            fatal.append(f"phrase {i + 1} only repeats the class name")
    seen: dict[str, int] = {}
    for i, p in enumerate(phrases):
        if p and p.casefold() in seen:
            fatal.append(f"phrases {seen[p.casefold()] + 1} and {i + 1} are the same")
        seen.setdefault(p.casefold(), i)
    texts = [sentence_frame.format(phrase=p, class_name=class_name) for p in phrases]
    fatal += [f"phrase {i + 1} is {len(p):,} characters long; keep phrases under 12 words"
              for i, p in enumerate(phrases) if len(p) > MAX_PHRASE_CHARS]
    # An overlong phrase is fatal already: its tokens are not counted (it shows 2, the empty text's).
    counted = [t if len(p) <= MAX_PHRASE_CHARS else "" for p, t in zip(phrases, texts)]
    tokens = count_tokens(counted) if counted else []
    for i, t in enumerate(tokens):
        if t > context_length:
            fatal.append(f"phrase {i + 1} makes a sentence of {t} tokens, over the "
                         f"{context_length}-token context; keep phrases under 12 words")
    descriptions = [Description(p, t, k, notes) for (p, notes), t, k in zip(cleaned, texts, tokens)]
    return Verdict(descriptions, fatal)


def validate_sentences(sentences: Sequence[object], n: int, class_name: str, sentence_frame: str,
                       count_tokens: TokenCounter, context_length: int) -> Verdict:
    """Imported full sentences (e.g. the MSTA authors' files): text kept verbatim, defects noted."""
    if not all(isinstance(s, str) for s in sentences):
        kinds = sorted({type(s).__name__ for s in sentences if not isinstance(s, str)})
        return Verdict([], [f"entries must be strings, found {', '.join(kinds)}"])
    strings = [re.sub(r"\s+", " ", s).strip() for s in sentences]  # type: ignore[arg-type]
    if len(strings) != n:
        why = f"expected {n} descriptions, found {len(strings)}"
        if len(strings) == 1 and len(_SENTENCE_BREAK.split(strings[0])) > 1:
            why += (f"; the one string holds {len(_SENTENCE_BREAK.split(strings[0]))} sentences "
                    "run together")
        return Verdict([], [why])
    empty = [i + 1 for i, s in enumerate(strings) if not s]
    if empty:
        return Verdict([], [f"description {i} is empty" for i in empty])
    pattern = sentence_pattern(sentence_frame)
    tokens = count_tokens(strings)
    out: list[Description] = []
    for i, (s, k) in enumerate(zip(strings, tokens)):
        problems: list[str] = []
        m = pattern.match(s)
        if m is None and _VIDEOS_TYPO.match(s):
            m = pattern.match(_VIDEOS_TYPO.sub(r"\1video", s))
            problems.append("typo 'A videos'")
        if m is None:
            phrase = s.rstrip(".")
            problems.append(f"does not follow the frame {sentence_frame!r}")
        else:
            phrase = m.group("phrase")
            named = m.groupdict().get("class_name")
            if named is not None and named.strip().lower() != class_name.lower():
                squashed = named.replace(" ", "").lower() == class_name.replace(" ", "").lower()
                problems.append(f"names the class {'squashed as' if squashed else 'as'} {named!r}")
        phrase, notes = clean_phrase(phrase)
        problems += [f"{note} from the phrase" for note in notes]
        if _same_as_class(phrase, class_name):
            problems.append("only repeats the class name")
        if any(d.text.casefold() == s.casefold() for d in out):
            problems.append("duplicate of another description of this class")
        if k > context_length:
            problems.append(f"{k} tokens, over the {context_length}-token context: CLIP truncates it")
        out.append(Description(phrase, s, k, problems))
    return Verdict(out, [])

