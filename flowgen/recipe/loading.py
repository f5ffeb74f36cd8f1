"""Loading a recipe file: safe YAML, `--set` overrides, then validation stage by stage.

load(): YAML -> --set overrides -> structure -> tasks -> model card -> datasets -> matrix checks.
Each stage adds to one list of problems so a user sees everything wrong in one go; stages that
depend on an earlier one (datasets need a valid structure) are skipped when it failed.

Safe YAML (flowgen/safe_yaml.py): data only, bounded in size, depth and alias expansion, with
file:line:col in every syntax error.

`--set a.b.c=value` overrides are applied to the raw recipe dict before validation. The value is a
YAML scalar or flow collection parsed with the same safe loader as recipes (`task.steps=8` -> 8,
`task.outputFormat=PNG` -> "PNG", `task.inputs.referenceImages=[a.jpg]`). A numeric path segment
indexes an existing list (`task.inputs.referenceImages.0=b.jpg`).
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
from flowgen.recipe.expansion import RESERVED
from flowgen.recipe.schema import Recipe
from flowgen.recipe.templates import TemplateProblem, is_template, template_fields
from flowgen.recipe.validation import (
    card_defaults,
    find_card,
    format_errors,
    merge_tasks,
    merged_problems,
    task_problems,
)
from flowgen.safe_yaml import parse_yaml, read_yaml_file

# --- load(): the stages ------------------------------------------------------------------------


_TOP_KEYS = ", ".join(Recipe.model_fields)


def load(path: Path, overrides: list[str]) -> Recipe:
    """See flowgen.recipe.api.load_recipe."""
    recipe, problems, _ = load_with_problems(path, overrides)
    if problems:
        raise RecipeError(problems)
    return recipe


def load_with_problems(path: Path, overrides: list[str]) -> tuple[Recipe, list[str], bool]:
    """(recipe, its problems, whether it can still be expanded) — for `validate`, which goes on to
    the templates and references so that every problem shows at once. Raises RecipeError only when
    there is no recipe to go on with (YAML, structure). Expandable: model, datasets and matrix are
    sound (task and output problems do not stop the expansion; it reports other fields)."""
    shown = str(path)
    data = read_yaml_file(path, shown)
    if not isinstance(data, dict):
        raise RecipeError(
            f"{shown}: a recipe must be a YAML mapping with keys such as {_TOP_KEYS}; "
            f"got {'an empty file' if data is None else type(data).__name__}"
        )
    problems = apply_overrides(data, overrides)
    blocking = _plain_data_problems(data)
    recipe = _structure(data, problems + blocking)
    recipe._source_path = path.resolve()
    recipe._raw = copy.deepcopy(data)
    blocking += _model_problems(recipe)
    problems += blocking
    problems += _task_problems(recipe, problems)
    found = _dataset_problems(recipe) + _matrix_problems(recipe)
    blocking += found
    problems += found + _output_problems(recipe)
    return recipe, list(dict.fromkeys(problems)), not blocking


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
        return [
            f"recipe: holds a value that is not plain data ({err}); use strings, numbers, booleans, lists and mappings"
        ]
    return []


def _model_problems(recipe: Recipe) -> list[str]:
    """Settle the one model of the recipe (top level, task.model or defaults.model) and find its card."""
    named = {
        w: v
        for w, v in (
            ("model", recipe.model),
            ("task.model", recipe.task.get("model")),
            ("defaults.model", recipe.defaults.get("model")),
        )
        if v
    }
    if len(set(map(str, named.values()))) > 1:
        return [
            f"model: set to different values in {', '.join(f'{w}={v!r}' for w, v in named.items())}; "
            "one recipe uses one model"
        ]
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
    problems: list[str] = []
    owner: dict[str, str] = {}  # variable -> where it is defined
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
                    problems.append(
                        f"{kind}[{index}].{var}: not a matrix variable; variables: {', '.join(owner) or 'none'}"
                    )
                if var in RESERVED:
                    problems.append(f"{kind}[{index}].{var}: '{var}' is reserved for templates; rename the variable")
    return problems


def _output_problems(recipe: Recipe) -> list[str]:
    problems = []
    for field, template, allowed in (
        ("output.dir", recipe.output.dir, {"name"}),
        ("output.filename", recipe.output.filename, None),
    ):
        try:
            names = template_fields(template)
        except TemplateProblem as bad:
            problems.append(f"{field}: {bad.message}")
            continue
        if allowed is not None and set(names) - allowed:
            problems.append(f"{field}: may only use {{name}}, got {{{sorted(set(names) - allowed)[0]}}}")
        problem = _static_path_problem(field, template)
        if problem:
            problems.append(f"{field}: {template!r} {problem}")
    if "{ext}" not in recipe.output.filename and "{ext:" not in recipe.output.filename:
        problems.append("output.filename: must contain {ext} so the file's extension follows outputFormat")
    return problems


def _static_path_problem(field: str, template: str) -> str | None:
    """Escapes visible in the template text itself; data-driven ones are caught per item (naming.py)."""
    if not template.strip():
        return "is empty"
    if template.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", template):
        return "is absolute; it must be relative"
    if ".." in re.split(r"[\\/]", template):
        return "contains '..', which escapes the output folder"
    if field == "output.filename" and any(part.startswith(".") for part in re.split(r"[\\/]", template)):
        return "has a part starting with '.', which would be hidden (and '.flowgen' holds the run's records)"
    return None


# --- --set overrides ----------------------------------------------------------------------------


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
        raise RecipeError(
            f"--set {text!r}: bad key segment {bad[0]!r} in {key!r}; use names and list indexes joined by dots"
        )
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
