"""`{field}` templates: the only dynamic feature of a recipe (no expressions, no code).

`{product.name}` reads column `name` of the matrix variable `product`; `{surface}` a scalar
variable; `{result:03d}` applies a Python format spec; `{{` and `}}` are literal braces.
A string that is exactly one placeholder keeps the value's type (a JSONL number stays a number).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
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
            raise TemplateProblem(
                f"bad placeholder {match.group(0)!r}; "
                "write {field} or {variable.column}, and {{ }} for literal braces"
            )
        names.append(name)
    return names


def available_fields(context: dict[str, Any]) -> list[str]:
    """Every dotted name a template may use with this context (rows expand to their columns)."""
    names: list[str] = []
    for name, value in context.items():
        if isinstance(value, dict):
            names.extend(f"{name}.{column}" for column in value)
        else:
            names.append(name)
    return names


def render(template: str, context: dict[str, Any]) -> Any:
    """Fill a template from the context. Raises TemplateProblem naming an unknown field."""
    return compile_template(template).render(context)


@functools.lru_cache(maxsize=4096)
def compile_template(template: str) -> CompiledTemplate:
    """The template parsed once (recipes render the same few templates for 100k items)."""
    return CompiledTemplate(template)


class CompiledTemplate:
    """A template split once into literal texts and placeholders; render() is what `render` does."""

    __slots__ = ("template", "error", "whole", "first", "slots", "fields")

    def __init__(self, template: str):
        self.template = template
        self.error: str | None = None
        try:
            self.fields = tuple(template_fields(template))
        except TemplateProblem as problem:  # raised on every render, before any lookup, as before
            self.error, self.fields = problem.message, ()
        whole = _TOKEN.fullmatch(template)
        # A lone placeholder without a format spec returns the value itself (keeps its type).
        lone = whole is not None and whole.group(1) is not None and ":" not in whole.group(1) and self.fields
        self.whole = _Placeholder(self.fields[0], "") if lone else None
        placeholders: list[_Placeholder] = []
        literals: list[str] = [""]  # the text before each placeholder, and after the last one
        position = 0
        for match in _TOKEN.finditer(template):
            literals[-1] += template[position : match.start()]
            if match.group(1) is None:
                literals[-1] += match.group(0)[0]  # {{ -> {, }} -> }
            else:
                name, _, spec = match.group(1).partition(":")
                placeholders.append(_Placeholder(name.strip(), spec))
                literals.append("")
            position = match.end()
        literals[-1] += template[position:]
        self.first = literals[0]
        self.slots = tuple(zip(placeholders, literals[1:]))  # (placeholder, the text after it)

    def render(self, context: dict[str, Any]) -> Any:
        """Fill the template from the context. Raises TemplateProblem naming an unknown field."""
        if self.error is not None:
            raise TemplateProblem(self.error)
        if self.whole is not None:
            return self.whole.value(context)
        texts = [self.first]
        for placeholder, after in self.slots:  # in order: the first unknown field is the one reported
            value: Any = context
            for part in placeholder.path:  # placeholder.value(), inlined: this is the hot loop of a big plan
                if value.__class__ is dict:
                    try:
                        value = value[part]
                    except KeyError:
                        raise TemplateProblem(f"template names unknown field {placeholder.name!r}") from None
                else:
                    value = placeholder.step(value, part)
            if placeholder.spec:
                try:
                    value = format(value, placeholder.spec)
                except (ValueError, TypeError):
                    raise TemplateProblem(
                        f"format {placeholder.spec!r} does not apply to {placeholder.name} = {value!r}"
                    ) from None
            elif value.__class__ is not str:
                value = _text(value)
            texts.append(value)
            texts.append(after)
        return "".join(texts)


class _Placeholder:
    """One `{name:spec}`, with its dotted name split once."""

    __slots__ = ("name", "spec", "path")

    def __init__(self, name: str, spec: str):
        self.name, self.spec, self.path = name, spec, tuple(name.split("."))

    def value(self, context: dict[str, Any]) -> Any:
        """Resolve the dotted name in the context (dict keys, list indexes); TemplateProblem when unknown."""
        value: Any = context
        for part in self.path:
            if value.__class__ is dict:  # the usual case, one dict access
                try:
                    value = value[part]
                except KeyError:
                    raise TemplateProblem(f"template names unknown field {self.name!r}") from None
            else:
                value = self.step(value, part)
        return value

    def step(self, value: Any, part: str) -> Any:
        """One step into anything but a plain dict (dict subclasses, lists)."""
        if isinstance(value, dict) and part in value:
            return value[part]
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            return value[int(part)]
        raise TemplateProblem(f"template names unknown field {self.name!r}")


def render_tree(value: Any, context: dict[str, Any]) -> Any:
    """Render every string inside nested dicts/lists; other values pass through."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, dict):
        return {key: render_tree(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [render_tree(item, context) for item in value]
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def compile_tree(value: Any) -> Callable[[dict[str, Any]], Any]:
    """render_tree(value, context) as a function of the context, with every template parsed once."""
    if isinstance(value, str):
        return compile_template(value).render
    if isinstance(value, dict):
        fields = [(key, compile_tree(item)) for key, item in value.items()]
        return lambda context: {key: render_item(context) for key, render_item in fields}
    if isinstance(value, list):
        items = [compile_tree(item) for item in value]
        return lambda context: [render_item(context) for render_item in items]
    return lambda context: value
