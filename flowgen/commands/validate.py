"""`flowgen validate RECIPE`: load, expand and check references; report every problem, write nothing."""

from __future__ import annotations

import click

from flowgen.errors import RecipeError


def validate_command(recipe_path: str, overrides: list[str]) -> None:
    """Validate a recipe end to end; raise RecipeError with every problem, else print a one-line summary
    (and a note when the model's weights are not on this machine: `run` would stop there)."""
    from flowgen.commands.models import weights_note
    from flowgen.recipe.api import recipe_problems

    recipe, items, problems = recipe_problems(recipe_path, overrides)  # every stage's problems at once
    if problems:
        raise RecipeError(problems)
    results = sum(item.number_results for item in items)
    references = len({path for item in items for path in item.references})
    card = f" (card {recipe.card.name})" if recipe.card is not None else ""
    click.echo(
        f"ok: {recipe_path}: {len(items)} items, {results} results, {references} reference images, "
        f"model {recipe.model}{card}, output {recipe.output_dir(None)}"
    )
    note = weights_note(recipe.card)  # not an error: the recipe is fine, this machine lacks the weights
    if note:
        click.echo(f"note: {note}")
