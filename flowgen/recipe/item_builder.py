"""The fast path of expand(): combination -> Item with the per-recipe work done once.

The straightforward path (expand._item) renders, merges and validates a whole task with pydantic
for every item: ~300 µs, or 30 s for a 100k-item recipe. Most of a task is the same for every item,
and TaskFields validates each field on its own (no model-level validators), so ItemBuilder splits
the task once per recipe:

- static fields (no placeholder in `defaults:` or `task:`): rendered, merged, validated and
  cleaned once, copied into each item;
- dynamic fields: rendered per item and checked with the field's own validator.

Required fields are checked once for static fields, per item for dynamic ones. The other whole-task
rules (model-card rules, engine support) run once when they never look at a dynamic field (see
rule_reads.py), else per item. Whenever anything is off (a template problem, an invalid or null
value, a field it cannot check on its own) build() returns None and expand() takes the
straightforward path, which reports the problem with the exact same message as before.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Callable

from pydantic import BeforeValidator

from flowgen.recipe.item import Item
from flowgen.recipe.rule_reads import constant_result
from flowgen.recipe.support import support_problems
from flowgen.recipe.task_model import TaskFields
from flowgen.recipe.task_rules import REQUIRED, is_missing, merge_tasks, model_rule_problems, required_problems
from flowgen.recipe.templates import TemplateProblem, compile_tree, is_template, render_tree

_FIELD_ORDER = tuple(TaskFields.model_fields)  # model_dump's key order, which items keep


class ItemBuilder:
    """Builds Items for one recipe; `enabled` is False when the recipe needs the straightforward path."""

    def __init__(self, recipe: Any, base_defaults: dict[str, Any]):
        self.name, self.model, self.distilled, self.card = recipe.name, recipe.model, recipe.distilled, recipe.card
        self.recipe_dir = recipe.recipe_dir
        dynamic = [f for layer in (recipe.defaults, recipe.task) for f, v in layer.items() if _has_placeholder(v)]
        self.dynamic = tuple(dict.fromkeys(dynamic))
        self.render_defaults = tuple((f, compile_tree(recipe.defaults[f])) for f in self.dynamic if f in recipe.defaults)
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
            return support_problems(task, "task") + model_rule_problems(task, "task", self.model, self.distilled, self.card)

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
            rendered_defaults = {f: render(context) for f, render in self.render_defaults} if self.render_defaults else {}
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
                clean.update(TaskFields.model_validate({f: dynamic[f] for f in self.nested}).model_dump(exclude_none=True))
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
    """The validator of a field typed Optional[Annotated[Any, BeforeValidator(check)]], else None."""
    args = typing.get_args(TaskFields.model_fields[field].annotation)
    if len(args) != 2 or args[1] is not type(None) or typing.get_origin(args[0]) is not typing.Annotated:
        return None
    inner, *metadata = typing.get_args(args[0])
    if inner is not Any or len(metadata) != 1 or not isinstance(metadata[0], BeforeValidator):
        return None
    return metadata[0].func


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
