"""`{field}` templates: the only dynamic feature of a recipe (no expressions, no code).

`{product.name}` reads column `name` of the matrix variable `product`; `{surface}` a scalar
variable; `{result:03d}` applies a Python format spec; `{{` and `}}` are literal braces.
A string that is exactly one placeholder keeps the value's type (a JSONL number stays a number).
"""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


class TemplateProblem(Exception):
    """A template names a field that does not exist, or is malformed. `message` is user-facing."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def is_template(value: Any) -> bool:
    """True when `value` is a string holding at least one `{...}` placeholder."""
    return isinstance(value, str) and any(m.group(1) is not None for m in _TOKEN.finditer(value))


def template_fields(value: str) -> list[str]:
    """The field names used by a template, e.g. ['product.name', 'surface']; raises on malformed ones."""
    names = []
    for match in _TOKEN.finditer(value):
        if match.group(1) is None:
            continue
        name = match.group(1).split(":", 1)[0].strip()
        if not _FIELD.match(name):
            raise TemplateProblem(f"bad placeholder {match.group(0)!r}; write {{field}} or {{variable.column}}, and {{{{ }}}} for literal braces")
        names.append(name)
    return names


def lookup(context: dict[str, Any], name: str) -> Any:
    """Resolve a dotted name in the context; raise KeyError when any part is missing."""
    value: Any = context
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(name)
    return value


def available_fields(context: dict[str, Any]) -> list[str]:
    """Every dotted name a template may use with this context (rows expand to their columns)."""
    names = []
    for name, value in context.items():
        if isinstance(value, dict):
            names.extend(f"{name}.{column}" for column in value)
        else:
            names.append(name)
    return names


def render(template: str, context: dict[str, Any]) -> Any:
    """Fill a template from the context. Raises TemplateProblem naming an unknown field."""
    fields = template_fields(template)
    whole = _TOKEN.fullmatch(template)
    if whole and whole.group(1) is not None and ":" not in whole.group(1):
        return _get(context, fields[0])

    def replace(match: re.Match) -> str:
        if match.group(1) is None:
            return match.group(0)[0]
        name, _, spec = match.group(1).partition(":")
        value = _get(context, name.strip())
        try:
            return format(value, spec) if spec else _text(value)
        except (ValueError, TypeError):
            raise TemplateProblem(f"format {spec!r} does not apply to {name.strip()} = {value!r}") from None

    return _TOKEN.sub(replace, template)


def render_tree(value: Any, context: dict[str, Any]) -> Any:
    """Render every string inside nested dicts/lists; other values pass through."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, dict):
        return {key: render_tree(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [render_tree(item, context) for item in value]
    return value


def _get(context: dict[str, Any], name: str) -> Any:
    try:
        return lookup(context, name)
    except KeyError:
        raise TemplateProblem(f"template names unknown field {name!r}") from None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
