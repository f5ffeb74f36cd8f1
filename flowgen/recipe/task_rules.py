"""Validation of imageInference task dicts: spec rules, engine support, model-specific rules.

Used three times: on `defaults:` and `task:` as written (template placeholders skipped), and on
every expanded item's resolved task (where templates have become values).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from flowgen.recipe.models import model_label
from flowgen.recipe.problems import format_errors
from flowgen.recipe.support import support_problems
from flowgen.recipe.task_model import TaskFields
from flowgen.recipe.templates import is_template

REQUIRED = ("positivePrompt", "width", "height")


def task_problems(task: Any, where: str = "task") -> list[str]:
    """Spec and engine-support problems of one task dict; templated values are not judged."""
    if not isinstance(task, dict):
        return [f"{where}: must be a mapping of imageInference fields, got {type(task).__name__}"]
    templated = set(_templated_paths(task))
    try:
        TaskFields.model_validate(task)
        spec_errors: list[tuple] = []
    except ValidationError as err:
        spec_errors = [tuple(e["loc"]) for e in err.errors()]
        kept = [e for e in err.errors() if not any(tuple(e["loc"])[: len(t)] == t for t in templated)]
        problems = format_errors(kept, where, TaskFields)
    else:
        problems = []
    invalid = {str(loc[0]) for loc in spec_errors if loc}  # an invalid value needs no second complaint
    problems += [p for p in support_problems(task, where) if _top_field(p, where) not in invalid]
    return problems


def _top_field(problem: str, where: str) -> str:
    """'task.inputs.referenceImages[0]: ...' -> 'inputs'."""
    path = problem.split(":", 1)[0].removeprefix(where + ".")
    return path.split(".", 1)[0].split("[", 1)[0]


def merge_tasks(*layers: dict) -> dict:
    """Merge task dicts, later layers winning; nested mappings merge, lists are replaced."""
    merged: dict = {}
    for layer in layers:
        for field, value in layer.items():
            below = merged.get(field)
            merged[field] = merge_tasks(below, value) if isinstance(value, dict) and isinstance(below, dict) else value
    return merged


def clean_task(task: dict) -> dict:
    """The validated task with values normalised (CSV strings -> numbers); call after task_problems is empty."""
    return TaskFields.model_validate(task).model_dump(exclude_none=True)


def merged_problems(task: dict, where: str, model: str | None, distilled: bool | None, card: Any = None) -> list[str]:
    """Rules that need the whole merged task: required fields, model-card rules, cache steps."""
    return required_problems(task, where, model) + model_rule_problems(task, where, model, distilled, card)


def required_problems(task: dict, where: str, model: str | None) -> list[str]:
    """The required fields (and a model) are present and not empty."""
    problems = [f"{where}.{name}: required" for name in REQUIRED if is_missing(task.get(name))]
    if not model:
        problems.append("model: required (set the top-level `model:` or task.model)")
    return problems


def is_missing(value: Any) -> bool:
    """Whether a required field's value counts as not given."""
    return value in (None, "")


def model_rule_problems(task: dict, where: str, model: str | None, distilled: bool | None, card: Any = None) -> list[str]:
    """Model-card rules (guidance on distilled models) and cache-step consistency."""
    problems = []
    cfg = _float(task.get("CFGScale"))
    limits = getattr(card, "limits", None)
    cfg_allowed = getattr(limits, "cfg", None) if limits is not None else None
    if cfg is not None and cfg > 1 and (distilled or cfg_allowed is False):
        why = "is guidance-distilled" if distilled else "takes no guidance"
        problems.append(f"{where}.CFGScale: {model_label(model, card)} {why}, so CFGScale must be absent or <= 1, got {task['CFGScale']!r}")
    problems += _cache_step_problems(task, where)
    return problems


def _cache_step_problems(task: dict, where: str) -> list[str]:
    options = task.get("acceleratorOptions")
    if not isinstance(options, dict):
        return []
    start, end = _float(options.get("cacheStartStep")), _float(options.get("cacheEndStep"))
    steps = _float(task.get("steps"))
    problems = []
    if start is not None and end is not None and not start < end:
        problems.append(f"{where}.acceleratorOptions.cacheEndStep: must be greater than cacheStartStep ({start:g}), got {end:g}")
    if end is not None and steps is not None and end > steps:
        problems.append(f"{where}.acceleratorOptions.cacheEndStep: must be <= steps ({steps:g}), got {end:g}")
    low, high = _float(options.get("cacheStartStepPercentage")), _float(options.get("cacheEndStepPercentage"))
    if low is not None and high is not None and not low < high:
        problems.append(f"{where}.acceleratorOptions.cacheEndStepPercentage: must be greater than cacheStartStepPercentage ({low:g}), got {high:g}")
    return problems


def _templated_paths(value: Any, path: tuple = ()) -> list[tuple]:
    if is_template(value):
        return [path]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _templated_paths(item, path + (key,))]
    if isinstance(value, list):
        return [p for index, item in enumerate(value) for p in _templated_paths(item, path + (index,))]
    return []


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
