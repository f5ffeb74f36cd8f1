"""Turn pydantic ValidationErrors into one-line problems that name the field path."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from flowgen.recipe.fields import shown
from flowgen.recipe.task_model import submodel_at

_KINDS = {
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "bool_type": "must be true or false",
    "literal_error": None,  # pydantic's own message names the allowed values
}


def join_path(prefix: str, loc: tuple[Any, ...]) -> str:
    """('inputs', 'referenceImages', 0) under 'task' -> 'task.inputs.referenceImages[0]'."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path


def format_errors(err: ValidationError | list[dict], prefix: str, model: type[BaseModel]) -> list[str]:
    """One line per pydantic error: '<path>: <what is allowed>, got <value>'."""
    lines = []
    for error in err.errors() if isinstance(err, ValidationError) else err:
        loc = tuple(error["loc"])
        lines.append(f"{join_path(prefix, loc) or prefix or 'recipe'}: {_message(error, loc, model)}")
    return list(dict.fromkeys(lines))


def _message(error: dict, loc: tuple[Any, ...], model: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = submodel_at(model, loc)
        allowed = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field; {hint}allowed: {', '.join(allowed)}" if allowed else "unknown field"
    if kind == "missing":
        return "required"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if _KINDS.get(kind):
        message = _KINDS[kind]
    if "got " not in message and kind != "value_error":
        message += f", got {shown(error.get('input'))}"
    return message
