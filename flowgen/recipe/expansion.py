"""Expansion: the recipe's matrix -> combinations -> Items with resolved, validated tasks.

Matrix: cartesian product of variables, `zip:` groups, then `exclude:`, then `include:`. Semantics
follow GitHub Actions' strategy.matrix: exclude removes matching combinations; each include entry
extends every combination its matrix values match (adding new variables, never overwriting matrix
values), and becomes a new combination when it matches none. A combination maps variable -> Row;
its key is "var=rowkey|..." over variables sorted by name.

expand(), per combination: render `defaults` and `task` templates from the combination's rows,
merge (card defaults < defaults < task), set `model`, resolve reference images against the recipe
folder, validate the result (validation.py), and check that output file names are safe and
distinct (naming.py). Problems are collected over all items; identical problems from many rows are
reported once. ItemBuilder (below) does the same per-item work faster; _item is the reference path
it falls back to, and the one that words every problem.
"""

from __future__ import annotations

import itertools
import os
import typing
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import Any

from pydantic import BeforeValidator

from flowgen.errors import RecipeError
from flowgen.gc_pause import paused_gc
from flowgen.recipe.datasets import Row, as_text
from flowgen.recipe.schema import Item, TaskFields
from flowgen.recipe.spec import OUTPUT_EXTENSIONS, SPEC_CFG_DEFAULT, SPEC_DEFAULTS
from flowgen.recipe.templates import TemplateProblem, available_fields, compile_tree, is_template, render_tree
from flowgen.recipe.validation import (
    REQUIRED,
    card_defaults,
    clean_task,
    constant_result,
    is_missing,
    merge_tasks,
    merged_problems,
    model_rule_problems,
    required_problems,
    support_problems,
    task_problems,
)

# --- The matrix: combinations of dataset rows and inline values ----------------------------------


MAX_ITEMS = 100_000
RESERVED = ("name", "key", "slug", "result", "ext")

Combo = dict[str, Row]


def combo_key(combo: Combo) -> str:
    """The stable item key: sorted variables, each with its row's dataset key (never a position)."""
    return "|".join(f"{var}={combo[var].key}" for var in sorted(combo))


def keyed_combos(combos: list[Combo]) -> list[tuple[str, Combo]]:
    """(combo_key(combo), combo) for every combination; the variable order is sorted once per
    distinct set of variables, not once per combination."""
    orders: dict[tuple, list[tuple[str, str]]] = {}
    keyed = []
    for combo in combos:
        names = tuple(combo)
        order = orders.get(names)
        if order is None:
            order = orders[names] = [(var, f"{var}=") for var in sorted(combo)]
        keyed.append(("|".join([prefix + combo[var].key for var, prefix in order]), combo))
    return keyed


def factors(recipe: Any, problems: list[str]) -> list[list[Combo]]:
    """One list of partial combinations per matrix variable or zip group."""
    rows_of = recipe._rows
    result = []
    for var, source in recipe.matrix.items():
        result.append([{var: row} for row in _source_rows(var, source, rows_of, f"matrix.{var}", problems)])
    for index, group in enumerate(recipe.zip):
        columns = {
            var: _source_rows(var, source, rows_of, f"zip[{index}].{var}", problems) for var, source in group.items()
        }
        lengths = {var: len(rows) for var, rows in columns.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{var} has {n}" for var, n in lengths.items())
            problems.append(f"zip[{index}]: variables must have the same number of rows to be paired ({shown})")
            continue
        result.append([dict(zip(columns, paired)) for paired in zip(*columns.values())])
    return result


def source_rows(recipe: Any) -> dict[str, list[Row]]:
    """Variable -> its rows (dataset rows or inline values) for every matrix and zip variable."""
    sink: list[str] = []
    found = {var: _source_rows(var, src, recipe._rows, "", sink) for var, src in recipe.matrix.items()}
    for group in recipe.zip:
        found.update({var: _source_rows(var, src, recipe._rows, "", sink) for var, src in group.items()})
    return found


def _source_rows(var: str, source: Any, rows_of: dict, where: str, problems: list[str]) -> list[Row]:
    if isinstance(source, str):
        return rows_of.get(source) or []
    rows, seen = [], set()
    for index, value in enumerate(source):
        row = Row(as_text(value), value, f"{where}[{index}]")
        if row.key in seen:
            problems.append(f"{where}[{index}]: duplicate value {value!r}; matrix values must be unique")
        seen.add(row.key)
        rows.append(row)
    return rows


def expand_keyed_combos(recipe: Any) -> tuple[list[tuple[str, Combo]], list[str]]:
    """All (key, combination) pairs after product, zip, exclude and include; returns (pairs, problems)."""
    problems: list[str] = []
    groups = factors(recipe, problems)
    size = 1
    for group in groups:
        size *= len(group)
    if size > MAX_ITEMS:
        return [], [f"matrix: expands to {size} items; the limit is {MAX_ITEMS} (split the recipe or filter datasets)"]
    if groups:
        combos = [_joined(parts) for parts in itertools.product(*groups)]
    else:
        combos = [] if recipe.include else [{}]
    variables = list(recipe.matrix) + [var for group in recipe.zip for var in group]
    if recipe.exclude:
        combos = [c for c in combos if not any(matches(c, entry) for entry in recipe.exclude)]
    all_rows = source_rows(recipe)
    originals = len(combos)  # as in CI matrices, include entries match only the original combinations
    for index, entry in enumerate(recipe.include):
        combos = _apply_include(combos, originals, entry, set(variables), all_rows, f"include[{index}]", problems)
    keyed = keyed_combos(combos)
    if len({key for key, _ in keyed}) < len(keyed):
        seen: dict[str, int] = {}
        for key, _ in keyed:
            seen[key] = seen.get(key, 0) + 1
        problems += [
            f"matrix: {n} combinations share the key {key!r}; include entries must not repeat a combination"
            for key, n in seen.items()
            if n > 1
        ]
    return keyed, problems


def _joined(parts: tuple[Combo, ...]) -> Combo:
    combo: Combo = {}
    for part in parts:
        combo.update(part)
    return combo


def matches(combo: Combo, entry: dict[str, Any]) -> bool:
    """True when every variable named in `entry` is present in `combo` and its row matches the pattern."""
    return all(var in combo and row_matches(combo[var], pattern) for var, pattern in entry.items())


def row_matches(row: Row, pattern: Any) -> bool:
    """A pattern matches a row by key (scalar), by columns (mapping, nested allowed) or any-of (list)."""
    if isinstance(pattern, list):
        return any(row_matches(row, p) for p in pattern)
    if isinstance(pattern, dict):
        return _data_matches(row.data, pattern)
    return row.key == as_text(pattern) or (not isinstance(row.data, dict) and as_text(row.data) == as_text(pattern))


def _data_matches(data: Any, pattern: Any) -> bool:
    if isinstance(pattern, dict):
        return isinstance(data, dict) and all(k in data and _data_matches(data[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        return any(_data_matches(data, p) for p in pattern)
    return as_text(data) == as_text(pattern)


def _apply_include(
    combos: list[Combo],
    originals: int,
    entry: dict,
    variables: set[str],
    all_rows: dict,
    where: str,
    problems: list[str],
) -> list[Combo]:
    matrix_part = {var: pattern for var, pattern in entry.items() if var in variables}
    extras: dict[str, Row] = {}
    for var, value in entry.items():
        if var in variables:
            continue
        if isinstance(value, (dict, list)) or value is None:
            problems.append(f"{where}.{var}: a variable added by include must be a scalar, got {value!r}")
            continue
        extras[var] = Row(as_text(value), value, f"{where}.{var}")
    extended = False
    result = []
    for index, combo in enumerate(combos):
        if index < originals and matches(combo, matrix_part):
            combo = {**combo, **extras}  # added values may overwrite earlier added ones, never matrix values
            extended = True
        result.append(combo)
    if extended:
        return result
    new_combo = dict(extras)
    for var, pattern in matrix_part.items():
        row = _pick_row(var, pattern, all_rows.get(var, []), f"{where}.{var}", problems)
        if row is not None:
            new_combo[var] = row
    return result + [new_combo]


def _pick_row(var: str, pattern: Any, rows: list[Row], where: str, problems: list[str]) -> Row | None:
    """The one existing row an include pattern names; a scalar not among inline values is a new value."""
    found = [row for row in rows if row_matches(row, pattern)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        problems.append(
            f"{where}: {pattern!r} matches {len(found)} rows ({', '.join(r.key for r in found[:5])}); name exactly one"
        )
        return None
    if not isinstance(pattern, (dict, list)) and not any(isinstance(r.data, dict) for r in rows):
        return Row(as_text(pattern), pattern, where)  # a new scalar value, as in CI matrices
    problems.append(
        f"{where}: no row matches {pattern!r}" + (f"; keys: {', '.join(r.key for r in rows[:8])}" if rows else "")
    )
    return None


# --- expand(): combinations -> Items (the straightforward path, which words every problem) -------


MAX_REPORTED = 25  # beyond this many problems, say how many more instead of flooding the terminal


def expand(recipe: Any) -> list[Item]:
    """See flowgen.recipe.api.expand_items."""
    items, problems = expand_with_problems(recipe)
    if problems:
        raise RecipeError(problems)
    return items


def expand_with_problems(recipe: Any) -> tuple[list[Item], list[str]]:
    """(the items that expanded cleanly, every problem) — `validate` goes on to check those items'
    references, so that every problem shows at once."""
    with paused_gc():
        return _expand(recipe)


def _expand(recipe: Any) -> tuple[list[Item], list[str]]:
    keyed, problems = expand_keyed_combos(recipe)
    if problems:
        return [], problems
    dataset_of = _dataset_of_variables(recipe)
    builder = _item_builder(recipe) if keyed else None
    items: list[Item] = []
    problems = []
    repeats: dict[str, int] = {}
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
        problems = problems[:MAX_REPORTED] + ([f"... and {extra} more problems"] if extra > 0 else [])
    return items, problems


def _item_builder(recipe: Any) -> ItemBuilder | None:
    """The fast path, or None if it cannot even be set up (then _item meets the same trouble and
    behaves exactly as it always did)."""
    try:
        return ItemBuilder(recipe, base_defaults(recipe.card, recipe.distilled))
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
    task = merge_tasks(base_defaults(recipe.card, recipe.distilled), parts[0], parts[1])
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
    return f"{problem} [and {more} more item{'s' if more > 1 else ''} with this problem]" if more else problem


def base_defaults(card: Any, distilled: bool | None) -> dict:
    """Spec defaults of the fields the engine uses, under the model card's defaults: the lowest
    layer of every task, a recipe item's and a served one's (flowgen.serve.tasks)."""
    base = dict(SPEC_DEFAULTS)
    if distilled is False:
        base["CFGScale"] = SPEC_CFG_DEFAULT  # guidance only where the model is known to use it
    return {**base, **card_defaults(card, distilled)}


def _render_part(template: dict, where: str, context: dict, combo: dict, dataset_of: dict) -> tuple[dict, list[str]]:
    rendered, problems = {}, []
    for field, value in template.items():
        try:
            rendered[field] = render_tree(value, context)
        except TemplateProblem as problem:
            problems.append(
                f"{where}.{field}: {problem.message}{_row_hint(problem.message, combo, dataset_of)}; "
                f"available: {', '.join(available_fields(context))}"
            )
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
    return [
        f"task.taskUUID: must be unique per task; {uuid} is used by {len(keys)} items ({', '.join(keys[:3])})"
        for uuid, keys in owners.items()
        if len(keys) > 1
    ]


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


# --- The fast path of expand(): combination -> Item with the per-recipe work done once -----------
#
# The straightforward path (_item above) renders, merges and validates a whole task with pydantic
# for every item: ~300 µs, or 30 s for a 100k-item recipe. Most of a task is the same for every item,
# and TaskFields validates each field on its own (no model-level validators), so ItemBuilder splits
# the task once per recipe:
#
# - static fields (no placeholder in `defaults:` or `task:`): rendered, merged, validated and
#   cleaned once, copied into each item;
# - dynamic fields: rendered per item and checked with the field's own validator.
#
# Required fields are checked once for static fields, per item for dynamic ones. The other whole-task
# rules (model-card rules, engine support) run once when they never look at a dynamic field (see
# validation.constant_result), else per item. Whenever anything is off (a template problem, an
# invalid or null value, a field it cannot check on its own) build() returns None and expand() takes
# the straightforward path, which reports the problem with the exact same message as before.


_FIELD_ORDER = tuple(TaskFields.model_fields)  # model_dump's key order, which items keep


class ItemBuilder:
    """Builds Items for one recipe; `enabled` is False when the recipe needs the straightforward path."""

    def __init__(self, recipe: Any, base_defaults: dict[str, Any]):
        self.name, self.model, self.distilled, self.card = recipe.name, recipe.model, recipe.distilled, recipe.card
        self.recipe_dir = recipe.recipe_dir
        dynamic = [f for layer in (recipe.defaults, recipe.task) for f, v in layer.items() if _has_placeholder(v)]
        self.dynamic = tuple(dict.fromkeys(dynamic))
        self.render_defaults = tuple(
            (f, compile_tree(recipe.defaults[f])) for f in self.dynamic if f in recipe.defaults
        )
        self.render_task = tuple((f, compile_tree(recipe.task[f])) for f in self.dynamic if f in recipe.task)
        self.base_dynamic = {f: base_defaults[f] for f in self.dynamic if f in base_defaults}
        # with one layer holding all dynamic fields, merging is taking that layer's fields as they are
        self.one_layer = not self.base_dynamic and not (self.render_defaults and self.render_task)
        self.checked = tuple(f for f in self.dynamic if f != "model")  # `model` is always the recipe's
        self.references: dict[str, tuple[Path, str]] = {}
        self.enabled = self._prepare(recipe, base_defaults)

    def _prepare(self, recipe: Any, base_defaults: dict[str, Any]) -> bool:
        if TaskFields.__pydantic_decorators__.model_validators:
            return False  # fields would no longer be independent of each other
        if any(f not in TaskFields.model_fields for f in self.checked):
            return False
        static = lambda layer: {f: render_tree(v, {}) for f, v in layer.items() if f not in self.dynamic}  # noqa: E731
        base = {f: v for f, v in base_defaults.items() if f not in self.dynamic}  # not templated, as in _item
        raw = merge_tasks(base, static(recipe.defaults), static(recipe.task))
        raw["model"] = recipe.model
        try:
            clean = TaskFields.model_validate(raw).model_dump(exclude_none=True)
        except Exception:  # noqa: BLE001 - invalid static values: every item reports them the usual way
            return False
        self.static_raw = raw
        self.scalar_checks = {f: check for f in self.checked if (check := _scalar_check(f)) is not None}
        self.nested = tuple(f for f in self.checked if f not in self.scalar_checks)
        # the cleaned task in model_dump order, dynamic fields as placeholders filled per item
        self.task_layout = {f: clean.get(f) for f in _FIELD_ORDER if f in clean or f in self.checked}
        self.static_containers = tuple(f for f, v in clean.items() if isinstance(v, (dict, list)))
        # required: the static fields (and the model) once, the dynamic ones per item
        if required_problems({**raw, **dict.fromkeys(self.checked, "given")}, "task", recipe.model):
            return False  # every item misses one: let the usual path report it
        self.required = tuple(f for f in self.checked if f in REQUIRED)

        def rules(task: dict) -> list[str]:
            return support_problems(task, "task") + model_rule_problems(
                task, "task", self.model, self.distilled, self.card
            )

        constant = constant_result(rules, raw, self.checked)
        if constant:
            return False  # every item breaks a rule: let the usual path report it
        self.rules_per_item = rules if constant is None else None
        return True

    def build(self, key: str, combo: dict) -> Item | None:
        """The item for one combination, or None: take the straightforward path for this one."""
        if not self.enabled:
            return None
        values = {var: row.data for var, row in combo.items()}
        context = {**values, "name": self.name, "key": key}
        try:
            rendered_defaults = (
                {f: render(context) for f, render in self.render_defaults} if self.render_defaults else {}
            )
            rendered_task = {f: render(context) for f, render in self.render_task} if self.render_task else {}
        except TemplateProblem:
            return None
        if self.one_layer:
            dynamic = rendered_task or rendered_defaults
        else:
            dynamic = merge_tasks(self.base_dynamic, rendered_defaults, rendered_task)
        clean = self._checked_values(dynamic)
        if clean is None:
            return None
        if self.rules_per_item is not None:
            raw = {**self.static_raw, **dynamic}
            raw["model"] = self.model
            if self.rules_per_item(raw):
                return None
        task = self.task_layout.copy()
        for field in self.checked:
            if field in clean:
                task[field] = clean[field]
            else:
                del task[field]
        for field in self.static_containers:
            task[field] = _copy(task[field])  # items must not share mutable parts
        references: tuple[Path, ...] = ()
        inputs = task.get("inputs")  # a cleaned task: a dict when present
        if inputs and inputs.get("referenceImages"):
            resolved = [self._reference(ref) for ref in inputs["referenceImages"]]
            references = tuple(path for path, _ in resolved)
            inputs["referenceImages"] = [text for _, text in resolved]
        return Item(key, values, task, references)

    def _checked_values(self, dynamic: dict[str, Any]) -> dict[str, Any] | None:
        """Validated (normalised) values of the dynamic fields, or None when any is off."""
        clean = {}
        for field in self.checked:
            value = dynamic[field]
            if value is None:  # valid but dropped by the cleaning: rare, leave it to the usual path
                return None
            if field in self.required and is_missing(value):
                return None
            check = self.scalar_checks.get(field)
            if check is not None:
                try:
                    clean[field] = check(value)
                except Exception:  # noqa: BLE001 - whatever it is, the straightforward path reports it
                    return None
        if self.nested:
            try:
                clean.update(
                    TaskFields.model_validate({f: dynamic[f] for f in self.nested}).model_dump(exclude_none=True)
                )
            except Exception:  # noqa: BLE001
                return None
        return clean

    def _reference(self, ref: str) -> tuple[Path, str]:
        """(absolute path, its text) of a reference, normalised once per distinct value."""
        found = self.references.get(ref)
        if found is None:
            path = Path(ref)
            path = Path(os.path.normpath(path if path.is_absolute() else self.recipe_dir / path))
            found = self.references[ref] = (path, str(path))
        return found


def _has_placeholder(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_placeholder(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_placeholder(v) for v in value)
    return is_template(value)


def _scalar_check(field: str) -> Callable[[Any], Any] | None:
    """The validator of a scalar field typed `Annotated[int, integer(...)] | None` (any of schema's field
    types: one BeforeValidator that returns the clean value), else None."""
    args = typing.get_args(TaskFields.model_fields[field].annotation)
    if len(args) != 2 or args[1] is not type(None) or typing.get_origin(args[0]) is not typing.Annotated:
        return None
    inner, *metadata = typing.get_args(args[0])
    if inner not in (int, float, str, bool) or len(metadata) != 1 or not isinstance(metadata[0], BeforeValidator):
        return None
    return typing.cast(Callable[[Any], Any], metadata[0].func)  # schema's checks take the value alone (no info)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
