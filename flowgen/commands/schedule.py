"""`flowgen schedule RECIPE... [--once]`: run each recipe when its `schedule:` is due (flowgen.run.schedule)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import click

from flowgen.errors import FlowgenError
from flowgen.run.dtype import dtype_setting
from flowgen.run.schedule import ScheduledRecipe, Scheduler


def schedule_command(recipes: Sequence[str], once: bool, max_batch: int | None = None, dtype: str | None = None) -> int:
    """Schedule RECIPES; returns the exit code (--once: 0 all due runs ok, 1 one failed, 2 one was
    refused or bad; the loop: 130 on Ctrl-C). Bad recipes or a missing `schedule:` raise FlowgenError
    before anything runs."""
    scheduler = build_scheduler(recipes, max_batch, dtype)
    return scheduler.once() if once else scheduler.loop()


def build_scheduler(recipes: Sequence[str], max_batch: int | None = None, dtype: str | None = None, *,
                    clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> Scheduler:
    """The scheduler of RECIPES, each due run going through `flowgen run`'s own path."""
    dtype_setting(dtype)  # a bad --dtype is an error now, not at 3 a.m.
    entries = [scheduled_recipe(path) for path in recipes]
    folders = {}
    for entry in entries:
        if entry.out_dir in folders:
            raise FlowgenError(f"{entry.recipe}: writes to {entry.out_dir} like {folders[entry.out_dir]}; "
                               "scheduled recipes need output folders of their own")
        folders[entry.out_dir] = entry.recipe

    def run(entry: ScheduledRecipe) -> int:
        from flowgen.commands.run import run_command  # loads the recipe (and its data) again: new rows count

        return run_command(entry.recipe, None, (), None, False, max_batch, dtype)

    return Scheduler(entries, run, clock=clock, sleep=sleep, log=lambda line: click.echo(line, err=True))


def scheduled_recipe(path: str) -> ScheduledRecipe:
    """The schedule of one recipe file (RecipeError for a bad recipe, FlowgenError without `schedule:`)."""
    from flowgen.recipe.api import load_recipe

    recipe = load_recipe(path)
    if recipe.schedule is None:
        raise FlowgenError(f'{path}: has no `schedule:`; add one such as schedule: "0 3 * * *" '
                           "(see docs/recipes.md, Schedules)")
    spec = recipe.schedule
    return ScheduledRecipe(recipe=str(path), name=recipe.name, out_dir=recipe.output_dir(None).resolve(),
                           cron=spec.cron.strip(), timezone=spec.timezone, missed=spec.missed)
