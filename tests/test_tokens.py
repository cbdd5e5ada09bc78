"""The torch-free CLIP token counter against open_clip's own tokenizer (written by OpenAI, not us)."""
from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from open_clip.tokenizer import SimpleTokenizer

from prompts.tokens import ClipTokenCounter, clip_token_counter

HOSTILE = ["", "   ", "&amp; &lt;b&gt; &amp;amp;", "café naïve Ünïcödé", "日本語のテキスト", "emoji 🎉🔥 done",
           "It's 12,345.67!!", "<start_of_text>hello<end_of_text>", "<START_OF_TEXT>", "Ã©tÃ© mojibake",
           "tab\tand\nnewline", "\u00ad soft\u200b hyphen", "x" * 300, "don't won't they'll I'd we've",
           "ﬁ ligature", "ＦＵＬＬ　ＷＩＤＴＨ", "العربية", "ẞ ß", "a video of pushing [something] from left to right."]
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:'!?-_/()[]&<>\t\néèüßçñøåæœ日本語中文한국어🎉👍🏽–—“”‘’…"


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer()


def open_clip_count(tok: SimpleTokenizer, text: str) -> int:
    return len(tok.encode(text)) + 2  # encode leaves out the start and end tokens


def test_hostile_and_random_text_counts_as_open_clip_does(reference: SimpleTokenizer) -> None:
    rng = random.Random(0)
    texts = HOSTILE + ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 120))) for _ in range(1500)]
    counter = ClipTokenCounter()
    assert counter(texts) == [open_clip_count(reference, t) for t in texts]


def test_real_class_names_and_the_authors_descriptions_count_as_open_clip_does(
        reference: SimpleTokenizer, shared_data: Path) -> None:
    texts = [cell for f in sorted((shared_data / "labels").glob("*.csv")) for row in csv.reader(f.open()) for cell in row]
    for f in sorted((shared_data / "msta_descriptions").glob("*.json")):
        for entry in json.loads(f.read_text()).values():
            texts += entry if isinstance(entry, list) else [str(entry)]
    assert len(texts) > 30_000
    counter = clip_token_counter()
    mismatches = [(t, n, open_clip_count(reference, t)) for t, n in zip(texts, counter(texts))
                  if n != open_clip_count(reference, t)]
    assert mismatches == []


def test_the_counter_loads_without_torch() -> None:
    code = ("import sys; from prompts.tokens import clip_token_counter; "
            "n = clip_token_counter().count('a video of a dog'); print(n, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == ["7", "False"]
