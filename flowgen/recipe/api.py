"""The recipe layer's public surface: load, expand, validate. Everything else in flowgen/recipe is private.

    recipe = load_recipe("recipes/product-photos.yaml", ["task.steps=8"])
    items = expand_items(recipe)                 # list[Item], see flowgen/recipe/schema.py
    problems = check_references(items)           # [] when every reference image is usable
    out = recipe.output_dir(None)                # <recipe folder>/out/<name>, or the --out folder
    name = recipe.render_filename(items[0], 0, "webp")   # relative to `out`, never escapes it

All user errors raise flowgen.errors.RecipeError carrying every problem found, one line each,
each naming the field path (``task.width: ...``) or the file (``recipe.yaml:3:5: ...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flowgen.errors import RecipeError
from flowgen.recipe.schema import Item, Recipe

__all__ = [
    "Recipe",
    "Item",
    "RecipeError",
    "load_recipe",
    "expand_items",
    "validate_task",
    "check_references",
    "recipe_problems",
    "extension_for",
]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (``--set a.b=value``) and validate a recipe file; load its datasets.

    Raises RecipeError listing every problem (YAML syntax with file:line:col, unknown keys, ranges,
    datasets that are missing or have duplicate keys, bad overrides, ...).
    """
    from flowgen.recipe.loading import load

    return load(Path(path), list(overrides))


def expand_items(recipe: Recipe) -> list[Item]:
    """Expand the matrix (product, zip, include, exclude) into Items with fully resolved tasks.

    Item.key is "var=value|var=value" over all variables sorted by name, where a dataset row's value
    is its dataset key; Item.task holds card defaults < recipe defaults < task, templated, with
    ``model`` set and ``inputs.referenceImages`` as absolute paths (also in Item.references).
    Items are sorted by key. Raises RecipeError for unknown template fields or invalid tasks.
    """
    from flowgen.recipe.expansion import expand

    return expand(recipe)


def recipe_problems(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Recipe, list[Item], list[str]]:
    """Everything wrong with a recipe at once (what `flowgen validate` reports): the loading stages,
    then — unless its model, datasets or matrix are broken — the expansion (templates, per-item
    tasks) and the references of the items that expanded. Returns (recipe, those items, problems);
    raises RecipeError only when the file is not a recipe at all (YAML, structure)."""
    from flowgen.recipe.expansion import expand_with_problems
    from flowgen.recipe.loading import load_with_problems

    recipe, problems, expandable = load_with_problems(Path(path), list(overrides))
    if not expandable:
        return recipe, [], problems
    judged = {problem.split(":", 1)[0] for problem in problems}  # a field reported once, not again per item
    # a task field already found wrong is left out of the expansion (its default stands in), so that
    # every item still expands and the templates and references of all of them are checked
    wrong = {
        path.split(".")[1] for path in judged if path.count(".") == 1 and path.split(".")[0] in ("task", "defaults")
    }
    expanded = (
        recipe
        if not wrong
        else recipe.model_copy(
            update={
                "task": {k: v for k, v in recipe.task.items() if k not in wrong},
                "defaults": {k: v for k, v in recipe.defaults.items() if k not in wrong},
            }
        )
    )
    items, found = expand_with_problems(expanded)
    problems = problems + [p for p in found if p.split(":", 1)[0] not in judged]
    return recipe, items, problems + check_references(items)


def validate_task(task: dict, where: str = "task") -> list[str]:
    """Problems with one imageInference task dict (spec ranges + what the local engine supports).

    Fields still holding a template (``"{product.w}"``) are skipped; ``where`` prefixes each path.
    """
    from flowgen.recipe.validation import task_problems

    return task_problems(task, where)


def check_references(items: Sequence[Item]) -> list[str]:
    """Problems with the reference images of `items`: missing, undecodable, too small/large, > 4.

    Reads image headers only (PIL, no full decode); each problem names the file and the item key.
    """
    from flowgen.recipe.validation import reference_problems

    return reference_problems(items)


def extension_for(task: dict) -> str:
    """File extension for a task's outputFormat (JPG -> "jpg", PNG -> "png", WEBP -> "webp")."""
    from flowgen.recipe.spec import OUTPUT_EXTENSIONS

    return OUTPUT_EXTENSIONS[task.get("outputFormat", "JPG")]
