"""How many CLIP text tokens a sentence takes, without importing torch.

open_clip's tokenizer module imports torch (4.5 s on a 2-core machine) only to hand back tensors;
describe needs nothing but the count, to hold every sentence within CLIP's 77-token context. This
applies the same steps to open_clip's own packaged merge list: clean the text (ftfy, HTML entities,
whitespace, lower case), split it into words with CLIP's pattern, map each word's UTF-8 bytes to
the byte alphabet, then merge symbol pairs by rank until no ranked pair is left. Each remaining
symbol is one token. tests/test_tokens.py holds it equal to open_clip's SimpleTokenizer on the real
class lists, the MSTA authors' descriptions and hostile text.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
from collections.abc import Sequence
from functools import cache
from itertools import pairwise
from pathlib import Path

# CLIP's vocabulary: 256 byte symbols, the same with the end-of-word mark, 48,894 merges, 2 specials.
_MERGES = 49152 - 256 - 2
_SPECIALS = ("<start_of_text>", "<end_of_text>")
_END = "</w>"


def _vocabulary_file() -> Path:
    """open_clip's packaged merge list, found without importing open_clip (its __init__ imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed: it holds CLIP's BPE vocabulary")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def _byte_alphabet() -> dict[int, str]:
    """A printable character for each byte value: printable Latin-1 bytes stand for themselves, the
    others (controls, space, soft hyphen, ...) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    spare = 256
    for b in range(256):
        if b not in alphabet:
            alphabet[b] = chr(spare)
            spare += 1
    return alphabet


class ClipTokenCounter:
    """Token counts of CLIP's BPE (start and end tokens included); safe to share between threads."""

    def __init__(self, vocabulary: Path | None = None) -> None:
        import regex

        with gzip.open(vocabulary or _vocabulary_file()) as f:
            lines = f.read().decode("utf-8").split("\n")[1:_MERGES + 1]
        self._rank = {tuple(line.split()): rank for rank, line in enumerate(lines)}
        self._alphabet = _byte_alphabet()
        specials = "|".join(_SPECIALS)  # matched as one token each, as open_clip's pattern does
        self._words = regex.compile(specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                    regex.IGNORECASE)
        self._pieces: dict[str, int] = dict.fromkeys(_SPECIALS, 1)  # word -> its token count

    def __call__(self, texts: Sequence[str]) -> list[int]:
        return [self.count(t) for t in texts]

    def count(self, text: str) -> int:
        total = 2  # <start_of_text> and <end_of_text>
        for word in self._words.findall(_clean(text)):
            pieces = self._pieces.get(word)
            if pieces is None:
                pieces = self._pieces[word] = self._merge(word)
            total += pieces
        return total

    def _merge(self, word: str) -> int:
        symbols = [self._alphabet[b] for b in word.encode("utf-8")]
        symbols[-1] += _END
        unranked = len(self._rank)
        while len(symbols) > 1:
            first, second = min(pairwise(symbols), key=lambda pair: self._rank.get(pair, unranked))
            if (first, second) not in self._rank:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):  # every non-overlapping occurrence, left to right
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return len(symbols)


def _clean(text: str) -> str:
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


@cache
def clip_token_counter() -> ClipTokenCounter:
    """One counter per process: reading the merge list takes a moment. Built by the stage before
    its request threads start, then shared by them."""
    return ClipTokenCounter()
