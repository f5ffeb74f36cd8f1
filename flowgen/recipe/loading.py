"""load(): YAML -> --set overrides -> structure -> tasks -> model card -> datasets -> matrix checks.

Each stage adds to one list of problems so a user sees everything wrong in one go; stages that
depend on an earlier one (datasets need a valid structure) are skipped when it failed.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flowgen.errors import RecipeError
from flowgen.recipe.datasets import load_dataset
from flowgen.recipe.matrix import RESERVED
from flowgen.recipe.models import card_defaults, find_card, is_distilled
from flowgen.recipe.overrides import apply_overrides
from flowgen.recipe.problems import format_errors
from flowgen.recipe.schema import Recipe
from flowgen.recipe.task_rules import merge_tasks, merged_problems, task_problems
from flowgen.recipe.templates import TemplateProblem, is_template, template_fields
from flowgen.recipe.yaml_io import read_yaml_file

_TOP_KEYS = ", ".join(Recipe.model_fields)


def load(path: Path, overrides: list[str]) -> Recipe:
    """See flowgen.recipe.api.load_recipe."""
    shown = str(path)
    data = read_yaml_file(path, shown)
    if not isinstance(data, dict):
        raise RecipeError(f"{shown}: a recipe must be a YAML mapping with keys such as {_TOP_KEYS}; got {'an empty file' if data is None else type(data).__name__}")
    problems = apply_overrides(data, overrides)
    problems += _plain_data_problems(data)
    recipe = _structure(data, problems)
    recipe._source_path = path.resolve()
    recipe._raw = copy.deepcopy(data)
    problems += _model_problems(recipe)
    problems += _task_problems(recipe, problems)
    problems += _dataset_problems(recipe)
    problems += _matrix_problems(recipe)
    problems += _output_problems(recipe)
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    return recipe


def _structure(data: dict, problems: list[str]) -> Recipe:
    """The Recipe model, or RecipeError with the structural problems plus the task problems beside them."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        problems = problems + format_errors(err, "", Recipe)
        for field in ("defaults", "task"):
            if isinstance(data.get(field), dict):
                problems += task_problems(data[field], field)
        raise RecipeError(problems) from None


def _task_problems(recipe: Recipe, earlier: list[str]) -> list[str]:
    """`defaults` and `task` as written, then the rules that need them merged (with the model card)."""
    problems = task_problems(recipe.defaults, "defaults") + task_problems(recipe.task, "task")
    merged = merge_tasks(card_defaults(recipe.card, recipe.distilled), recipe.defaults, recipe.task)
    judged = {problem.split(":", 1)[0] for problem in earlier + problems}  # one problem per field is enough
    later = merged_problems(merged, "task", recipe.model, recipe.distilled, recipe.card)
    return problems + [p for p in later if p.split(":", 1)[0] not in judged]


def _plain_data_problems(data: dict) -> list[str]:
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as err:
        return [f"recipe: holds a value that is not plain data ({err}); use strings, numbers, booleans, lists and mappings"]
    return []


def _model_problems(recipe: Recipe) -> list[str]:
    """Settle the one model of the recipe (top level, task.model or defaults.model) and find its card."""
    named = {w: v for w, v in (("model", recipe.model), ("task.model", recipe.task.get("model")), ("defaults.model", recipe.defaults.get("model"))) if v}
    if len(set(map(str, named.values()))) > 1:
        return [f"model: set to different values in {', '.join(f'{w}={v!r}' for w, v in named.items())}; one recipe uses one model"]
    if not named:
        return []  # merged_problems reports the missing model
    where, model = next(iter(named.items()))
    if not isinstance(model, str) or is_template(model):
        return [f"{where}: must be a fixed model name (no templates), got {model!r}"]
    recipe.model = model
    card, problem = find_card(model)
    recipe._card = card
    return [problem] if problem else []


def _dataset_problems(recipe: Recipe) -> list[str]:
    problems = []
    for name, spec in recipe.datasets.items():
        rows, found = load_dataset(name, spec, recipe.recipe_dir)
        recipe._rows[name] = None if found else rows  # None: failed to load, already reported
        problems += found
    return problems


def _matrix_problems(recipe: Recipe) -> list[str]:
    """Variables must be unique, not reserved, and name a dataset or list inline values."""
    problems, owner = [], {}
    sources = [(f"matrix.{var}", var, src) for var, src in recipe.matrix.items()]
    sources += [(f"zip[{i}].{var}", var, src) for i, group in enumerate(recipe.zip) for var, src in group.items()]
    for index, group in enumerate(recipe.zip):
        if len(group) < 2:
            problems.append(f"zip[{index}]: a zip group pairs two or more variables, got {len(group)}")
    for where, var, source in sources:
        if var in RESERVED:
            problems.append(f"{where}: '{var}' is reserved for templates ({', '.join(RESERVED)}); rename the variable")
        if var in owner:
            problems.append(f"{where}: variable '{var}' is already defined in {owner[var]}")
        owner[var] = where
        if not isinstance(source, (str, list)):
            problems.append(f"{where}: must be a dataset name or an inline list of values, got {source!r}")
        elif isinstance(source, str) and source not in recipe.datasets:
            known = ", ".join(recipe.datasets) or "none defined"
            problems.append(f"{where}: unknown dataset {source!r}; datasets: {known}")
        elif isinstance(source, list) and not source:
            problems.append(f"{where}: an inline list of values must not be empty")
        elif isinstance(source, list) and any(isinstance(v, (dict, list)) or v is None for v in source):
            problems.append(f"{where}: inline values must be scalars; put rows with columns in a dataset")
    for name, spec in recipe.datasets.items():
        if name in {s for _, _, s in sources if isinstance(s, str)} and recipe._rows.get(name) == []:
            problems.append(f"datasets.{name}: has no rows" + (" left after its filter" if spec.filter else ""))
    return problems + _pattern_problems(recipe, owner)


def _pattern_problems(recipe: Recipe, owner: dict[str, str]) -> list[str]:
    """include/exclude entries: non-empty, no reserved names; exclude may only name known variables."""
    problems = []
    for kind in ("include", "exclude"):
        for index, entry in enumerate(getattr(recipe, kind)):
            if not entry:
                problems.append(f"{kind}[{index}]: must name at least one variable")
            for var in entry:
                if kind == "exclude" and var not in owner:
                    problems.append(f"{kind}[{index}].{var}: not a matrix variable; variables: {', '.join(owner) or 'none'}")
                if var in RESERVED:
                    problems.append(f"{kind}[{index}].{var}: '{var}' is reserved for templates; rename the variable")
    return problems


def _output_problems(recipe: Recipe) -> list[str]:
    problems = []
    for field, template, allowed in (("output.dir", recipe.output.dir, {"name"}), ("output.filename", recipe.output.filename, None)):
        try:
            names = template_fields(template)
        except TemplateProblem as problem:
            problems.append(f"{field}: {problem.message}")
            continue
        if allowed is not None and set(names) - allowed:
            problems.append(f"{field}: may only use {{name}}, got {{{sorted(set(names) - allowed)[0]}}}")
        problem = _static_path_problem(template)
        if problem:
            problems.append(f"{field}: {template!r} {problem}")
    if "{ext}" not in recipe.output.filename and "{ext:" not in recipe.output.filename:
        problems.append("output.filename: must contain {ext} so the file's extension follows outputFormat")
    return problems


def _static_path_problem(template: str) -> str | None:
    """Escapes visible in the template text itself; data-driven ones are caught per item (naming.py)."""
    if not template.strip():
        return "is empty"
    if template.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", template):
        return "is absolute; it must be relative"
    if ".." in re.split(r"[\\/]", template):
        return "contains '..', which escapes the output folder"
    return None
