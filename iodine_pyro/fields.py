"""Configuration fields that carry their own rule.

A field of a configuration dataclass is declared with `ruled`, which puts its default and
the rule its values must follow in one place::

    num_slots: int = ruled(4, integer(1))                 # K

A rule is a function of a value that returns None when the value is allowed and otherwise
what it must be ("an integer >= 1"); `iodine_pyro.config.validate` turns that into one
line naming the field. `rules` reads them back from a dataclass. This module imports
nothing heavy: the command line reads configurations at start-up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

Rule = Callable[[Any], "str | None"]

INT_MAX = 2**31 - 1                      # torch's sizes and numpy's seeds stay below this
FLOAT32_MAX = 3.4028234663852886e38      # parameters are float32: a larger step is an infinite one

__all__ = ["Rule", "ruled", "rules", "integer", "odd", "number", "boolean", "choice", "optional", "integers",
           "names", "INT_MAX", "FLOAT32_MAX"]


def ruled(default: Any, rule: Rule) -> Any:
    """A dataclass field with this default and this rule (`rules` reads it back)."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def rules(cls: type) -> dict[str, Rule]:
    """``{field: rule}`` of a dataclass declared with `ruled` (fields without a rule left out)."""
    return {f.name: f.metadata["rule"] for f in dataclasses.fields(cls) if "rule" in f.metadata}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: int, hi: int = INT_MAX) -> Rule:
    def check(v):
        ok = _is_int(v) and lo <= v <= hi
        return None if ok else f"an integer from {lo} to {hi}" if hi != INT_MAX else f"an integer >= {lo}"
    return check


def odd(lo: int = 1) -> Rule:
    def check(v):
        ok = _is_int(v) and lo <= v <= INT_MAX and v % 2 == 1
        return None if ok else f"an odd integer >= {lo} ('same' padding)"
    return check


def number(lo: float, hi: float = FLOAT32_MAX, *, lo_open: bool = True, hi_open: bool = False) -> Rule:
    def check(v):
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi))
        if ok:
            return None
        if hi == FLOAT32_MAX:
            return "a finite number" if lo == -FLOAT32_MAX else f"a finite number {'>' if lo_open else '>='} {lo:g}"
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        return f"a finite number in {left}{lo:g}, {hi:g}{right}"
    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def choice(*allowed: str) -> Rule:
    def check(v):
        return None if isinstance(v, str) and v in allowed else f"one of {', '.join(allowed)}"
    return check


def optional(rule: Rule) -> Rule:
    def check(v):
        what = rule(v) if v is not None else None
        return None if what is None else f"{what}, or none"
    return check


def integers(length: int | None = None, lo: int = 1, nonempty: bool = True) -> Rule:
    def check(v):
        ok = (isinstance(v, (tuple, list)) and (length is None or len(v) == length)
              and (len(v) > 0 or not nonempty) and all(integer(lo)(x) is None for x in v))
        if ok:
            return None
        n = f"{length} " if length else "a list of " if nonempty else "a (possibly empty) list of "
        return f"{n}integers >= {lo}"
    return check


def names(v: Any) -> str | None:
    ok = isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v)
    return None if ok else "a list of names"
