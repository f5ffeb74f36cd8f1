"""The fast paths of a big plan give exactly what the straightforward code gives.

- templates: compiled templates vs the original regex renderer (kept here as the reference);
- ItemBuilder (per-recipe validation) vs expansion._item (full pydantic validation per item);
- ParamsJson / ItemHasher vs canonical_json(image_params(task)) / item_hash;
- validation.constant_result: a rule is run once only when it cannot see the varying fields.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import yaml

from flowgen.plan.hashing import ItemHasher, canonical_json, image_params, item_hash
from flowgen.plan.params_json import ParamsJson
from flowgen.recipe.api import load_recipe
from flowgen.recipe.expansion import ItemBuilder, _dataset_of_variables, _item, base_defaults, expand_keyed_combos
from flowgen.recipe.templates import TemplateProblem, render
from flowgen.recipe.validation import constant_result

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


def reference_render(template: str, context: dict):
    """The regex renderer flowgen used before templates were compiled (the semantics to keep)."""

    def get(name):
        value = context
        for part in name.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise TemplateProblem(f"template names unknown field {name!r}")
        return value

    def text(value):
        return "" if value is None else ("true" if value else "false") if isinstance(value, bool) else str(value)

    fields = []
    for match in _TOKEN.finditer(template):
        if match.group(1) is not None:
            name = match.group(1).split(":", 1)[0].strip()
            if not _FIELD.match(name):
                raise TemplateProblem(f"bad placeholder {match.group(0)!r}; write {{field}} or {{variable.column}}, and {{{{ }}}} for literal braces")
            fields.append(name)
    whole = _TOKEN.fullmatch(template)
    if whole and whole.group(1) is not None and ":" not in whole.group(1):
        return get(fields[0])

    def replace(match):
        if match.group(1) is None:
            return match.group(0)[0]
        name, _, spec = match.group(1).partition(":")
        value = get(name.strip())
        try:
            return format(value, spec) if spec else text(value)
        except (ValueError, TypeError):
            raise TemplateProblem(f"format {spec!r} does not apply to {name.strip()} = {value!r}") from None

    return _TOKEN.sub(replace, template)


def outcome(fn, *args):
    try:
        value = fn(*args)
        return ("ok", type(value).__name__, value)
    except TemplateProblem as problem:
        return ("problem", problem.message)


def test_compiled_templates_render_as_the_reference_renderer():
    from collections import OrderedDict

    context = {"a": "A", "b": {"c": 3, "d": [1, {"e": 5}]}, "l": ["x", OrderedDict(q=1)], "n": 7, "f": 2.5,
               "t": True, "z": None}
    pieces = ["{", "}", "{{", "}}", "a", " ", ":", "{a}", "{b.c}", "{b.x}", "{b.d.1.e}", "{l.1.q}", "{l.5}", "{n:03d}",
              "{f:.1f}", "{a:d}", "{ a }", "{}", "{1a}", "{a:}", "{t}", "{z}", "{b}", "{l.0.x}"]
    rng = random.Random(0)
    for _ in range(20000):
        template = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
        assert outcome(render, template, context) == outcome(reference_render, template, context), template


PRODUCTS = "sku,name,size,cfg,steps\nP1,white sneaker,256,2.5,4\nP2,brown {boot},320,3,8\nP3,,100,30,x\nP4,red loafer,256,1,2\n"


def recipe_file(tmp_path: Path, **changes) -> Path:
    (tmp_path / "refs").mkdir(exist_ok=True)
    (tmp_path / "products.csv").write_text(PRODUCTS)
    recipe = {"version": 1, "name": "fast", "model": "klein-base-4b", "seed": 3,
              "defaults": {"negativePrompt": "blurry {angle}"},
              "datasets": {"products": {"csv": "products.csv", "key": "{sku}"}},
              "matrix": {"product": "products", "angle": ["front", "side"]},
              "task": {"positivePrompt": "a {product.name}", "width": "{product.size}", "height": 256,
                       "CFGScale": "{product.cfg}", "inputs": {"referenceImages": ["refs/{product.sku}.png"]}},
              "output": {"filename": "{product.sku}_{angle}_{result}.{ext}"}}
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("changes", [
    {},  # valid and invalid rows mixed (P3); CFG rules per item (CFGScale varies)
    {"model": "runware:400@6"},  # distilled: CFGScale > 1 is refused per item
    {"task": {"positivePrompt": "{product.name}", "width": 512, "height": 512, "steps": "{product.steps}",
              "acceleration": "high"}},
    {"defaults": {"width": "{product.size}", "inputs": {"referenceImages": ["refs/a.png"]}},
     "task": {"positivePrompt": "x {angle}", "height": 256, "inputs": {"referenceImages": ["refs/{product.sku}.png"]}}},
    {"task": {"positivePrompt": "p", "width": 256, "height": 256, "scheduler": "{angle}"}},  # unknown scheduler
])
def test_item_builder_gives_the_items_and_problems_of_the_full_validation(tmp_path, changes):
    recipe = load_recipe(recipe_file(tmp_path, **changes))
    keyed, problems = expand_keyed_combos(recipe)
    assert not problems
    builder = ItemBuilder(recipe, base_defaults(recipe.card, recipe.distilled))
    dataset_of = _dataset_of_variables(recipe)
    fast = 0
    for key, combo in keyed:
        reference, found = _item(recipe, combo, dataset_of)
        built = builder.build(key, combo)
        if built is not None:
            fast += 1
            assert not found and built == reference
            assert list(built.task) == list(reference.task)  # same key order
        # the fast path never accepts what the full validation refuses
        assert reference is not None or built is None
    valid = sum(_item(recipe, combo, dataset_of)[0] is not None for _, combo in keyed)
    assert fast == valid  # and it takes every valid item


def test_params_json_and_item_hasher_match_the_reference_encoding():
    rng = random.Random(1)
    values = [1, 1.0, True, False, None, 0.0, -0.0, float("nan"), float("inf"), "x", "é", 'a"b', "", 2.5, 0, "1",
              [1, {"b": 2, "a": 1}], {"z": 1, "a": [1.5]}, 10**30]
    fields = ["positivePrompt", "width", "steps", "CFGScale", "seed", "numberResults", "outputFormat", "webhookURL",
              "inputs", "taskUUID", "zeta", "Alpha", "model"]
    inputs = [{}, None, {"referenceImages": ["a"]}, {"referenceImages": ["a"], "mask": "m"}, {"x": 1.0}]
    for _ in range(60):
        params_json, hasher = ParamsJson(), ItemHasher('{"m":1}')
        shape = rng.sample(fields, rng.randint(0, len(fields)))
        base = {f: rng.choice(inputs if f == "inputs" else values) for f in shape}
        for _ in range(60):  # mostly repeated values, sometimes another value or type
            task = {f: (rng.choice(inputs if f == "inputs" else values) if rng.random() < 0.1 else v) for f, v in base.items()}
            refs = rng.choice([[], ["aa"], ["aa", "bb"]])
            assert params_json(task) == canonical_json(image_params(task))
            assert hasher(task, refs) == item_hash('{"m":1}', task, refs)


def test_a_rule_runs_once_only_when_it_does_not_read_the_varying_fields():
    def prompt_rule(task):
        return ["long"] if len(task.get("positivePrompt") or "") > 3 else []

    def webhook_rule(task):
        return ["webhook"] if task.get("webhookURL") else []

    def whole_task_rule(task):
        return [f"{len(task)} fields"]

    static = {"width": 256, "webhookURL": None}
    assert constant_result(webhook_rule, static, ["positivePrompt"]) == []
    assert constant_result(prompt_rule, static, ["positivePrompt"]) is None
    assert constant_result(whole_task_rule, static, ["positivePrompt"]) is None  # iterating reads everything
