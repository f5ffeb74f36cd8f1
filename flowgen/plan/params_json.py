"""canonical_json(image_params(task)) for the many tasks of one plan, without re-encoding what repeats.

The tasks of a recipe mostly share their fields and most values (size, steps, format...); only a
few values (the prompt) change per item. Per set of field names, ParamsJson keeps the canonical
JSON as a list of pieces in sorted field order: the pieces of values seen constant so far are
encoded once ("fixed"), the others per task ("varying"). A task whose fixed value differs (by
value or by type: 1, 1.0 and True encode differently) moves that field to the varying ones.
The result is byte-for-byte canonical_json(image_params(task)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring_ascii
from operator import itemgetter
from typing import Any

from flowgen.plan.hashing import NON_IMAGE_FIELDS, canonical_json, image_params

_FIXABLE = (str, int, bool, type(None))  # exact types whose equal values encode the same


class ParamsJson:
    """Callable: task -> canonical_json(image_params(task))."""

    def __init__(self) -> None:
        self._shapes: dict[tuple, _Shape | None] = {}

    def __call__(self, task: Mapping[str, Any]) -> str:
        fields = tuple(task)
        shape = self._shapes.get(fields)
        if shape is None:
            if fields in self._shapes or not all(f.__class__ is str for f in fields):
                self._shapes[fields] = None  # non-string names: canonical_json converts or refuses them
                return canonical_json(image_params(task))
            shape = self._shapes[fields] = _Shape(fields, task)
        try:
            return shape.json(task)
        except Exception:  # noqa: BLE001 - odd values (uncomparable, unencodable): the reference way
            return canonical_json(image_params(task))


class _Shape:
    """The pieces of the canonical JSON for tasks with one set of field names."""

    def __init__(self, fields: tuple[str, ...], first: Mapping[str, Any]):
        self.order = sorted(f for f in fields if f not in NON_IMAGE_FIELDS or f == "inputs")
        self.keys = {f: canonical_json(f) + ":" for f in self.order}
        self.fixed = {f: first[f] for f in self.order if f != "inputs" and type(first[f]) in _FIXABLE}
        self._build()

    def _build(self) -> None:
        self.parts = [self.keys[f] + canonical_json(self.fixed[f]) if f in self.fixed else "" for f in self.order]
        self.varying = [(slot, f, self.keys[f]) for slot, f in enumerate(self.order) if f not in self.fixed]
        names = list(self.fixed)
        self.values = tuple(self.fixed[f] for f in names)
        self.types = tuple(map(type, self.values))
        # itemgetter of one name returns the value itself, not a 1-tuple: ask for it twice
        self.get: Callable[[Mapping], tuple] | None = (
            itemgetter(*names) if len(names) > 1 else (itemgetter(names[0], names[0]) if names else None)
        )
        if len(names) == 1:
            self.values, self.types = self.values * 2, self.types * 2

    def json(self, task: Mapping[str, Any]) -> str:
        if self.get is not None:
            values = self.get(task)
            if values != self.values or tuple(map(type, values)) != self.types:
                self._unfix(task)
        parts = self.parts.copy()
        for slot, field, key in self.varying:
            value = task[field]
            if field == "inputs":  # as image_params: only its fields other than referenceImages
                if value and not isinstance(value, dict):
                    return canonical_json(image_params(task))  # raises as image_params does
                others = {k: v for k, v in value.items() if k != "referenceImages"} if value else None
                parts[slot] = key + canonical_json(others) if others else ""
            else:
                parts[slot] = key + _encoded(value)
        return "{" + ",".join(filter(None, parts)) + "}"  # an empty piece is an absent "inputs"

    def _unfix(self, task: Mapping[str, Any]) -> None:
        """Move the fields whose value differs from the fixed one to the varying ones."""
        for field, value in list(self.fixed.items()):
            now = task[field]
            if type(now) is not type(value) or now != value:
                del self.fixed[field]
        self._build()


def _encoded(value: Any) -> str:
    """canonical_json(value), with the common scalars done directly (as the C encoder does)."""
    kind = value.__class__
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if kind is int:
        return int.__repr__(value)
    return canonical_json(value)
