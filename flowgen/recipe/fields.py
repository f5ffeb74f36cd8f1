"""Annotated field types whose error messages say what is allowed and what was given.

Values coming from CSV cells arrive as strings, so numbers and booleans also accept their plain
string spelling ("8", "0.5", "true"); everything else is strict (no bools as numbers, no floats
with fractions as integers).
"""

from __future__ import annotations

import difflib
import math
import re
import uuid
from typing import Any, Annotated, Iterable

from pydantic import AfterValidator, BeforeValidator


def shown(value: Any, limit: int = 60) -> str:
    """A short repr of a user value for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def integer(lo: int, hi: int | None = None, step: int | None = None):
    """An integer in [lo, hi] (hi None: no upper bound), optionally a multiple of `step`."""
    if step:
        allowed = f"a multiple of {step} between {lo} and {hi}"
    elif hi is None:
        allowed = f"an integer >= {lo}"
    else:
        allowed = f"an integer between {lo} and {hi}"

    def check(value: Any) -> int:
        number = _as_int(value)
        if number is None or number < lo or (hi is not None and number > hi) or (step and number % step):
            raise ValueError(f"must be {allowed}, got {shown(value)}")
        return number

    return Annotated[Any, BeforeValidator(check)]


def number(lo: float | None, hi: float | None, step: float | None = None):
    """A float in [lo, hi] (either bound may be None), optionally on a grid of `step`."""
    if lo is not None and hi is not None:
        bounds = f"between {lo:g} and {hi:g}"
    else:
        bounds = f">= {lo:g}" if lo is not None else f"<= {hi:g}"
    grid = f" in steps of {step:g}" if step else ""

    def check(value: Any) -> float:
        x = _as_float(value)
        bad = x is None or not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi)
        if not bad and step:
            bad = abs(x / step - round(x / step)) > 1e-6
        if bad:
            raise ValueError(f"must be a number {bounds}{grid}, got {shown(value)}")
        return x

    return Annotated[Any, BeforeValidator(check)]


def text(min_len: int = 0, max_len: int | None = None):
    """A string of min_len..max_len characters."""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {shown(value)}")
        if len(value) < min_len or (max_len is not None and len(value) > max_len):
            limit = f"{min_len} to {max_len}" if max_len is not None else f"at least {min_len}"
            raise ValueError(f"must have {limit} characters, got {len(value)}")
        return value

    return Annotated[Any, BeforeValidator(check)]


def boolean():
    """true/false (also the strings "true"/"false" from CSV cells)."""

    def check(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"must be true or false, got {shown(value)}")

    return Annotated[Any, BeforeValidator(check)]


def one_of(values: Iterable[str], what: str | None = None):
    """One of a fixed set of strings; long sets are named by `what` and get a did-you-mean hint."""
    allowed = tuple(values)

    def check(value: Any) -> str:
        if isinstance(value, str) and value in allowed:
            return value
        if what:
            close = difflib.get_close_matches(str(value), allowed, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"must be one of the {len(allowed)} {what}{hint}, got {shown(value)}")
        raise ValueError(f"must be one of {', '.join(allowed)}, got {shown(value)}")

    return Annotated[Any, BeforeValidator(check)]


def uri():
    """An absolute http(s) URL."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
            raise ValueError(f"must be an http(s) URL, got {shown(value)}")
        return value

    return Annotated[Any, BeforeValidator(check)]


def uuid_v4():
    """A UUID version 4 string."""

    def check(value: Any) -> str:
        try:
            parsed = uuid.UUID(str(value)) if isinstance(value, str) else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.version != 4:
            raise ValueError(f"must be a UUID v4, got {shown(value)}")
        return value

    return Annotated[Any, BeforeValidator(check)]


def sized_list(lo: int, hi: int | None, noun: str):
    """Post-check on a list's length, with a message in the user's terms."""

    def check(value: list) -> list:
        if len(value) < lo or (hi is not None and len(value) > hi):
            limit = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"must have {limit} {noun}, got {len(value)}")
        return value

    return AfterValidator(check)
