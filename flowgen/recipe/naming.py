"""Output naming: the output folder and each result's file name, both kept inside the folder.

A recipe may come from someone else (a customer, a scheduler), so its output paths are confined:
`output.dir` is relative to the recipe folder and `output.filename` relative to the output
folder; absolute paths and `..` segments are errors, whether written literally or produced by data.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from flowgen.errors import RecipeError
from flowgen.recipe.templates import TemplateProblem, available_fields, compile_template, render

if TYPE_CHECKING:  # schema.py imports this module (Recipe.filename_renderer)
    from flowgen.recipe.schema import Item

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = re.compile(r"[\\/]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Names path_problem accepts without looking further: '/'-separated segments of safe characters,
# none starting with a dot (so none is '.' or '..'), no spaces, no drive, no '~'.
_PLAINLY_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


def slug(key: str) -> str:
    """A file-name-safe form of an item key: 'product=A-100|surface=oak' -> 'product-A-100_surface-oak'."""
    text = "_".join(part.replace("=", "-", 1) for part in key.split("|")) if key else "item"
    return _UNSAFE.sub("-", text).strip("-") or "item"


def path_problem(rendered: str) -> str | None:
    """Why a rendered relative path would leave its folder (or be unusable), or None when it is fine."""
    if not rendered or rendered.strip() != rendered:
        return "is empty or has leading/trailing spaces"
    if rendered.startswith(("/", "\\", "~")) or _DRIVE.match(rendered):
        return "is absolute; it must be relative to the output folder"
    parts = _SEPARATORS.split(rendered) if "\\" in rendered else rendered.split("/")
    if ".." in parts:
        return "contains '..', which escapes the output folder"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' path segment"
    control = _CONTROL.search(rendered)
    if control:
        return f"contains the control character {control.group()!r}; names may not contain NUL, line breaks or tabs"
    return None


def filename_problem(rendered: str) -> str | None:
    """path_problem, and no part may start with '.' (a hidden file, or one inside `.flowgen`)."""
    problem = path_problem(rendered)
    if problem is None and any(part.startswith(".") for part in _SEPARATORS.split(rendered)):
        return "has a part starting with '.', which would be hidden (and '.flowgen' holds the run's records)"
    return problem


def _separators(text: str) -> int:
    return text.count("/") + text.count("\\")


def _value_separator_problem(compiled: Any, context: dict[str, Any], rendered: str) -> str | None:
    """Which value put a '/' or '\\' into the name the template's own text does not have."""
    literal = compiled.first + "".join(after for _, after in compiled.slots)
    if _separators(rendered) == _separators(literal):
        return None
    for placeholder, _ in compiled.slots:
        value = str(placeholder.value(context))
        if _separators(value):
            return (
                f"gets a path separator from {{{placeholder.name}}} = {value!r}; values may not contain '/' or "
                "'\\' (write subfolders into output.filename itself)"
            )
    return None


def output_dir(recipe: Any, base: Path | str | None) -> Path:
    """`base` when given (the --out option), else the rendered output.dir under the recipe folder."""
    if base is not None:
        return Path(base).expanduser().resolve()
    try:
        rendered = render(recipe.output.dir, {"name": recipe.name})
    except TemplateProblem as bad:
        raise RecipeError(f"output.dir: {bad.message}; available: name") from None
    problem = path_problem(str(rendered))
    if problem:
        raise RecipeError(f"output.dir: {rendered!r} {problem}")
    return recipe.recipe_dir / PurePosixPath(str(rendered))


def filename_context(recipe: Any, item: Item, result_index: int, ext: str) -> dict[str, Any]:
    """What output.filename may use: the item's variables plus name, key, slug, result, ext."""
    return {
        **item.values,
        "name": recipe.name,
        "key": item.key,
        "slug": slug(item.key),
        "result": result_index,
        "ext": ext,
    }


def render_filename(recipe: Any, item: Item, result_index: int, ext: str) -> str:
    """The result's path relative to the output folder; RecipeError naming output.filename if unsafe."""
    compiled = compile_template(recipe.output.filename)
    if "slug" in compiled.fields or "slug" in item.values:
        context = filename_context(recipe, item, result_index, ext)
    else:  # the same values without slug(), the costly one, which the template does not use
        context = {**item.values, "name": recipe.name, "key": item.key, "result": result_index, "ext": ext}
    try:
        rendered = str(compiled.render(context))
    except TemplateProblem as bad:
        fields = ", ".join(available_fields(filename_context(recipe, item, result_index, ext)))
        raise RecipeError(f"output.filename: {bad.message} (item {item.key!r}); available: {fields}") from None
    problem = filename_problem(rendered) or _value_separator_problem(compiled, context, rendered)
    if problem:
        raise RecipeError(f"output.filename: {rendered!r} for item {item.key!r} {problem}")
    return rendered.replace("\\", "/")


class FilenameRenderer:
    """render_filename for one recipe, remembering every name it rendered.

    expand() renders every result's name to check it, and the planner asks for the same names again;
    the second time is a dictionary lookup. Get one from Recipe.filename_renderer().
    """

    def __init__(self, recipe: Any):
        self.recipe, self.template, self.name = recipe, recipe.output.filename, recipe.name
        self._compiled = compile_template(self.template)
        self._uses_slug = "slug" in self._compiled.fields
        # the '/' of the template's own text: a plainly safe name with more got them from a value
        self._slashes = _separators(self._compiled.first + "".join(after for _, after in self._compiled.slots))
        self._names: dict[tuple[str, int, str], tuple[Item, str]] = {}

    def fits(self, recipe: Any) -> bool:
        """Whether this renderer still renders `recipe`'s names (its name and template are unchanged)."""
        return recipe is self.recipe and recipe.output.filename is self.template and recipe.name == self.name

    def __call__(self, item: Item, result_index: int, ext: str) -> str:
        memo_key = (item.key, result_index, ext)
        known = self._names.get(memo_key)
        if known is not None and known[0] is item:
            return known[1]
        name = None
        values = item.values
        if not self._uses_slug and "slug" not in values:  # render_filename's common case, inlined
            context = {**values, "name": self.name, "key": item.key, "result": result_index, "ext": ext}
            try:
                rendered = self._compiled.render(context)
            except TemplateProblem:
                rendered = None  # render_filename words the problem
            if rendered.__class__ is str and _PLAINLY_SAFE.fullmatch(rendered) and rendered.count("/") == self._slashes:
                name = rendered
        if name is None:
            name = render_filename(self.recipe, item, result_index, ext)
        self._names[memo_key] = (item, name)
        return name
