"""Checks of method config fields, shared by every config (``__post_init__``): each raises ``ValueError``
naming the field and what it expects, and returns the value in its canonical type."""

from __future__ import annotations

import numbers
from typing import Any, Sequence

__all__ = ["integer_in", "positive_int", "group_size", "number_in", "non_negative", "one_of"]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def integer_in(name: str, v: Any, lo: int, hi: int) -> int:
    """An integer in ``lo..hi``; an integral float (the CLI's ``2.0``) is accepted."""
    if _is_number(v) and not _is_int(v) and float(v).is_integer():
        v = int(v)
    if not _is_int(v) or not lo <= v <= hi:
        raise ValueError(f"{name}: expected an integer in {lo}..{hi}, got {v!r}")
    return int(v)


def positive_int(name: str, v: Any) -> int:
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    return int(v)


def group_size(v: Any) -> int:
    """The quantization group along the input features (docs/spec.md §1)."""
    return positive_int("group_size", v)


def number_in(name: str, v: Any, lo: float, hi: float, hi_open: bool = False) -> float:
    """A real number in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``)."""
    if not _is_number(v) or not (lo <= v < hi if hi_open else lo <= v <= hi):
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")
    return float(v)


def non_negative(name: str, v: Any) -> float:
    if not _is_number(v) or not v >= 0:
        raise ValueError(f"{name}: expected a non-negative number, got {v!r}")
    return float(v)


def one_of(name: str, v: Any, choices: Sequence[Any]) -> Any:
    if v not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {v!r}")
    return v
