"""`--set a.b.c=value` overrides, applied to the raw recipe dict before validation.

The value is a YAML scalar or flow collection parsed with the same safe loader as recipes
(`task.steps=8` -> 8, `task.outputFormat=PNG` -> "PNG", `task.inputs.referenceImages=[a.jpg]`).
A numeric path segment indexes an existing list (`task.inputs.referenceImages.0=b.jpg`).
"""

from __future__ import annotations

import re
from typing import Any

from flowgen.errors import RecipeError
from flowgen.recipe.yaml_io import parse_yaml

_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$|^[0-9]+$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'a.b=value' into (["a", "b"], parsed value); raise RecipeError naming the override."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. task.steps=8")
    path = key.split(".")
    bad = [segment for segment in path if not _SEGMENT.match(segment)]
    if bad:
        raise RecipeError(f"--set {text!r}: bad key segment {bad[0]!r} in {key!r}; use names and list indexes joined by dots")
    try:
        value = parse_yaml(value_text, f"--set {key}")
    except RecipeError as err:
        raise RecipeError(f"--set {text!r}: value is not valid YAML ({err.problems[0].split(': ', 1)[-1]})") from None
    return path, value


def apply_override(data: dict, path: list[str], value: Any, text: str) -> None:
    """Set data[path] = value, creating missing mappings; raise RecipeError when a step is not a container."""
    node: Any = data
    for depth, segment in enumerate(path[:-1]):
        node = _step(node, segment, path[: depth + 1], text, create=True)
    last = path[-1]
    if isinstance(node, list):
        index = _index(node, last, path, text)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {text!r}: {'.'.join(path[:-1])} holds {node!r}, not a mapping")


def _step(node: Any, segment: str, so_far: list[str], text: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, segment, so_far, text)]
    if not isinstance(node, dict):
        raise RecipeError(f"--set {text!r}: {'.'.join(so_far[:-1])} holds {node!r}, not a mapping")
    if segment not in node or node[segment] is None:
        node[segment] = {}
    return node[segment]


def _index(node: list, segment: str, so_far: list[str], text: str) -> int:
    if not segment.isdigit() or int(segment) >= len(node):
        raise RecipeError(f"--set {text!r}: {'.'.join(so_far)} must be an index below {len(node)} of an existing list")
    return int(segment)


def apply_overrides(data: dict, overrides: list[str]) -> list[str]:
    """Apply every override in order; return the problems (one per bad override) instead of stopping."""
    problems: list[str] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
            apply_override(data, path, value, text)
        except RecipeError as err:
            problems.extend(err.problems)
    return problems
