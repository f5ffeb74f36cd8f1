"""Output naming: the output folder and each result's file name, both kept inside the folder.

A recipe may come from someone else (a customer, a scheduler), so its output paths are confined:
`output.dir` is relative to the recipe folder and `output.filename` relative to the output
folder; absolute paths and `..` segments are errors, whether written literally or produced by data.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from flowgen.errors import RecipeError
from flowgen.recipe.item import Item
from flowgen.recipe.templates import TemplateProblem, available_fields, render

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(key: str) -> str:
    """A file-name-safe form of an item key: 'product=A-100|surface=oak' -> 'product-A-100_surface-oak'."""
    text = "_".join(part.replace("=", "-", 1) for part in key.split("|")) if key else "item"
    return _UNSAFE.sub("-", text).strip("-") or "item"


def path_problem(rendered: str) -> str | None:
    """Why a rendered relative path would leave its folder (or be unusable), or None when it is fine."""
    if not rendered or rendered.strip() != rendered:
        return "is empty or has leading/trailing spaces"
    if rendered.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", rendered):
        return "is absolute; it must be relative to the output folder"
    parts = re.split(r"[\\/]", rendered)
    if ".." in parts:
        return "contains '..', which escapes the output folder"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' path segment"
    return None


def output_dir(recipe: Any, base: Path | str | None) -> Path:
    """`base` when given (the --out option), else the rendered output.dir under the recipe folder."""
    if base is not None:
        return Path(base).expanduser().resolve()
    try:
        rendered = render(recipe.output.dir, {"name": recipe.name})
    except TemplateProblem as problem:
        raise RecipeError(f"output.dir: {problem.message}; available: name") from None
    problem = path_problem(str(rendered))
    if problem:
        raise RecipeError(f"output.dir: {rendered!r} {problem}")
    return recipe.recipe_dir / PurePosixPath(str(rendered))


def filename_context(recipe: Any, item: Item, result_index: int, ext: str) -> dict[str, Any]:
    """What output.filename may use: the item's variables plus name, key, slug, result, ext."""
    return {**item.values, "name": recipe.name, "key": item.key, "slug": slug(item.key), "result": result_index, "ext": ext}


def render_filename(recipe: Any, item: Item, result_index: int, ext: str) -> str:
    """The result's path relative to the output folder; RecipeError naming output.filename if unsafe."""
    context = filename_context(recipe, item, result_index, ext)
    try:
        rendered = str(render(recipe.output.filename, context))
    except TemplateProblem as problem:
        fields = ", ".join(available_fields(context))
        raise RecipeError(f"output.filename: {problem.message} (item {item.key!r}); available: {fields}") from None
    problem = path_problem(rendered)
    if problem:
        raise RecipeError(f"output.filename: {rendered!r} for item {item.key!r} {problem}")
    return rendered.replace("\\", "/")
