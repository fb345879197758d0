"""What a config value may be: rules that the config checks (:mod:`ddb_jax.config_checks`)
and each method's own section (:mod:`ddb_jax.methods.registry`) are written with.

A rule tests a value, says in words what is allowed (the end of "must be ..."), and holds
an invalid value of the key's type, with which the tests walk every key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Collection
from typing import Any


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a key accepts: ``test(value)``; ``allowed`` completes "must be ..."; ``invalid``
    is a value of the key's type that fails (the tests walk every key with it)."""

    test: Callable[[Any], bool]
    allowed: str
    invalid: Any


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int = 1, meaning: str = "", also: tuple[int, ...] = ()) -> Rule:
    """An integer >= ``minimum`` (or one of ``also``); ``meaning`` explains a special value."""
    allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    allowed += "".join(f" or {a}" for a in also) + (f" ({meaning})" if meaning else "")
    return Rule(lambda v: is_int(v) and (v >= minimum or v in also), allowed, minimum - 1)


def real(
    low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Rule:
    """A finite number in [low, high] (an end open where said; no ``high``: unbounded)."""

    def test(v: Any) -> bool:
        above = is_real(v) and (v > low if low_open else v >= low)
        return above and (high is None or (v < high if high_open else v <= high))

    if high is None:
        return Rule(test, f"a number {'>' if low_open else '>='} {low:g}", low - 1.0)
    ends = "(["[not low_open], ")]"[not high_open]
    return Rule(test, f"a number in {ends[0]}{low:g}, {high:g}{ends[1]}", high + 0.5)


def ints(length: int | None = None, minimum: int = 1, empty: bool = False) -> Rule:
    """A tuple of ``length`` integers >= ``minimum`` (``empty``: or ())."""

    def test(v: Any) -> bool:
        if isinstance(v, tuple | list) and not v:
            return empty
        return (
            isinstance(v, tuple | list)
            and (length is None or len(v) == length)
            and all(is_int(x) and x >= minimum for x in v)
        )

    count = {None: "", 2: "a pair of ", 4: "four "}[length]
    kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
    allowed = f"{count or 'a tuple of '}{kind}" + (" or ()" if empty else "")
    return Rule(test, allowed, (minimum - 1,) * (length or 1))


def one_of(values: Collection) -> Rule:
    """One of ``values``."""
    return Rule(lambda v: v in values, f"one of {list(values)}", "nope")


def each_of(values: Collection, empty: bool = True) -> Rule:
    """A tuple of names from ``values`` (``empty=False``: at least one)."""

    def test(v: Any) -> bool:
        return isinstance(v, tuple | list) and (empty or bool(v)) and all(x in values for x in v)

    return Rule(
        test, f"a tuple of {'' if empty else 'one or more '}names from {list(values)}", ("nope",)
    )


POSITIVE, NON_NEGATIVE, RATIO = integer(1), real(0.0), real(0.0, 1.0)
PAIR, BELOW_ONE = ints(2), real(0.0, 1.0, high_open=True)


# A path-valued setting (a folder or model directory that a graph wires in, or ''): checked
# for existence where it is read; here only for stray spaces.
PATH = Rule(
    lambda v: isinstance(v, str) and v == v.strip(), "a path without surrounding spaces, or ''",
    " x",
)  # fmt: skip
