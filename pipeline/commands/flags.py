"""Numeric flags, checked before anything runs: a count below its minimum or a weight that is not a
finite number is a usage error naming the flag (exit 2). Unchecked, `--shots -2` drew all but two
videos per class, `--epochs -1` registered an untrained model, `--batch-size 0` silently became 32
and `--alpha inf` ended in a traceback."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from cache.errors import UserError


@dataclass(frozen=True)
class Limit:
    low: float = -math.inf
    high: float = math.inf
    above: bool = False  # the value must exceed `low`, not just reach it

    def holds(self, value: float) -> bool:
        return math.isfinite(value) and self.low <= value <= self.high and not (self.above and value == self.low)

    def describe(self) -> str:
        if self.high < math.inf:
            return f"between {self.low:g} and {self.high:g}"
        if self.above:
            return "positive" if self.low == 0 else f"greater than {self.low:g}"
        if self.low > -math.inf:
            return f"at least {self.low:g}"
        return "a finite number"


COUNT = Limit(1)
NON_NEGATIVE = Limit(0)
POSITIVE = Limit(0, above=True)
PROBABILITY = Limit(0, 1)


def check_flags(values: Mapping[str, float | None], limits: Mapping[str, Limit]) -> None:
    """Raise a UserError (exit 2) naming the first flag in `values` outside its limit; None (a flag
    not given) passes."""
    for name, value in values.items():
        limit = limits[name]
        if value is not None and not limit.holds(value):
            what = limit.describe() if math.isfinite(value) else "a finite number"
            raise UserError(f"--{name.replace('_', '-')} must be {what}, not {value:g}", 2)
