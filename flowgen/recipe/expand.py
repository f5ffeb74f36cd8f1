"""expand(): matrix combinations -> Items with resolved, validated tasks.

Per combination: render `defaults` and `task` templates from the combination's rows, merge
(card defaults < defaults < task), set `model`, resolve reference images against the recipe
folder, validate the result, and check that output file names are safe and distinct.
Problems are collected over all items; identical problems from many rows are reported once.
ItemBuilder (item_builder.py) does the same per-item work faster; _item is the reference path it
falls back to, and the one that words every problem.
"""

from __future__ import annotations

import os
from operator import itemgetter
from pathlib import Path
from typing import Any

from flowgen.errors import RecipeError
from flowgen.gc_pause import paused_gc
from flowgen.recipe.item import Item
from flowgen.recipe.item_builder import ItemBuilder
from flowgen.recipe.matrix import combo_key, expand_keyed_combos
from flowgen.recipe.models import card_defaults
from flowgen.recipe.spec_values import OUTPUT_EXTENSIONS
from flowgen.recipe.task_rules import clean_task, merge_tasks, merged_problems, task_problems
from flowgen.recipe.templates import TemplateProblem, available_fields, render_tree

SPEC_DEFAULTS = {"numberResults": 1, "outputFormat": "JPG", "outputQuality": 95, "steps": 4}
SPEC_CFG_DEFAULT = 3.5
MAX_REPORTED = 25  # beyond this many problems, say how many more instead of flooding the terminal


def expand(recipe: Any) -> list[Item]:
    """See flowgen.recipe.api.expand_items."""
    with paused_gc():
        return _expand(recipe)


def _expand(recipe: Any) -> list[Item]:
    keyed, problems = expand_keyed_combos(recipe)
    if problems:
        raise RecipeError(problems)
    dataset_of = _dataset_of_variables(recipe)
    builder = _item_builder(recipe) if keyed else None
    items, problems, repeats = [], [], {}
    keyed.sort(key=itemgetter(0))  # keys are unique (checked above), so this is the order by key
    for key, combo in keyed:
        item = builder.build(key, combo) if builder is not None else None
        found: list[str] = []
        if item is None:  # a problem, or something only the full per-item validation handles
            item, found = _item(recipe, combo, dataset_of)
        for problem in found:
            gist = _gist(problem)  # the same problem in another row: count it, do not repeat it
            repeats[gist] = repeats.get(gist, 0) + 1
            if repeats[gist] == 1:
                problems.append(problem)
        if item is not None:
            items.append(item)
    problems = [_with_repeats(p, repeats) for p in problems]
    if not problems:
        problems = _unique_task_uuids(items) + _filename_problems(recipe, items)
    if problems:
        extra = len(problems) - MAX_REPORTED
        raise RecipeError(problems[:MAX_REPORTED] + ([f"... and {extra} more problems"] if extra > 0 else []))
    return items


def _item_builder(recipe: Any) -> ItemBuilder | None:
    """The fast path, or None if it cannot even be set up (then _item meets the same trouble and
    behaves exactly as it always did)."""
    try:
        return ItemBuilder(recipe, _base_defaults(recipe))
    except Exception:  # noqa: BLE001
        return None


def _item(recipe: Any, combo: dict, dataset_of: dict[str, str]) -> tuple[Item | None, list[str]]:
    key = combo_key(combo)
    values = {var: row.data for var, row in combo.items()}
    context = {**values, "name": recipe.name, "key": key}
    parts, problems = [], []
    for where, template in (("defaults", recipe.defaults), ("task", recipe.task)):
        rendered, problem = _render_part(template, where, context, combo, dataset_of)
        parts.append(rendered)
        problems += problem
    if problems:
        return None, problems
    task = merge_tasks(_base_defaults(recipe), parts[0], parts[1])
    task["model"] = recipe.model
    suffix = f" (item {key!r})" if key else ""
    found = task_problems(task, "task") + merged_problems(task, "task", recipe.model, recipe.distilled, recipe.card)
    if found:
        return None, [p + suffix for p in found]
    task = clean_task(task)
    references = tuple(_absolute(recipe.recipe_dir, ref) for ref in task.get("inputs", {}).get("referenceImages", []))
    if references:
        task["inputs"]["referenceImages"] = [str(path) for path in references]
    return Item(key=key, values=values, task=task, references=references), []


def _gist(problem: str) -> str:
    """A problem without its per-row details (the value and the item), to group repeats."""
    return problem.split(" (", 1)[0].split(", got ", 1)[0]


def _with_repeats(problem: str, repeats: dict[str, int]) -> str:
    more = repeats[_gist(problem)] - 1
    return f"{problem} [and {more} more item{'s' if more > 1 else ''}]" if more else problem


def _base_defaults(recipe: Any) -> dict:
    """Spec defaults of the fields the engine uses, under the model card's defaults."""
    base = dict(SPEC_DEFAULTS)
    if recipe.distilled is False:
        base["CFGScale"] = SPEC_CFG_DEFAULT  # guidance only where the model is known to use it
    return {**base, **card_defaults(recipe.card, recipe.distilled)}


def _render_part(template: dict, where: str, context: dict, combo: dict, dataset_of: dict) -> tuple[dict, list[str]]:
    rendered, problems = {}, []
    for field, value in template.items():
        try:
            rendered[field] = render_tree(value, context)
        except TemplateProblem as problem:
            problems.append(f"{where}.{field}: {problem.message}{_row_hint(problem.message, combo, dataset_of)}; available: {', '.join(available_fields(context))}")
    return rendered, problems


def _row_hint(message: str, combo: dict, dataset_of: dict[str, str]) -> str:
    """' (row A-100 of dataset products)' for the variable an unknown field starts with."""
    name = message.split("'")[1] if "'" in message else ""
    var = name.split(".")[0]
    if var in combo and var in dataset_of:
        return f" (row {combo[var].key} of dataset {dataset_of[var]})"
    if var in combo:
        return f" ({var} = {combo[var].data!r})"
    return ""


def _dataset_of_variables(recipe: Any) -> dict[str, str]:
    sources = dict(recipe.matrix)
    for group in recipe.zip:
        sources.update(group)
    return {var: src for var, src in sources.items() if isinstance(src, str)}


def _absolute(recipe_dir: Path, ref: str) -> Path:
    path = Path(ref)
    return Path(os.path.normpath(path if path.is_absolute() else recipe_dir / path))


def _unique_task_uuids(items: list[Item]) -> list[str]:
    owners: dict[str, list[str]] = {}
    for item in items:
        if "taskUUID" in item.task:
            owners.setdefault(item.task["taskUUID"], []).append(item.key)
    return [f"task.taskUUID: must be unique per task; {uuid} is used by {len(keys)} items ({', '.join(keys[:3])})" for uuid, keys in owners.items() if len(keys) > 1]


def _filename_problems(recipe: Any, items: list[Item]) -> list[str]:
    """Every result's file name is safe and no two results write the same file."""
    owners: dict[str, tuple[str, int]] = {}  # name -> (item key, result index)
    problems = []
    render_filename = recipe.filename_renderer()  # remembers the names for the planner
    for item in items:
        ext = OUTPUT_EXTENSIONS[item.task.get("outputFormat", "JPG")]
        for index in range(item.task.get("numberResults", 1)):
            try:
                name = render_filename(item, index, ext)
            except RecipeError as err:
                problems += [p for p in err.problems if p not in problems]
                break
            if name in owners:
                owner_key, owner_index = owners[name]
                problems.append(
                    f"output.filename: {name!r} is written by both item {owner_key!r} result {owner_index} "
                    f"and item {item.key!r} result {index}; "
                    "add {result} or the variable that tells them apart"
                )
                return problems
            owners[name] = (item.key, index)
    return problems
