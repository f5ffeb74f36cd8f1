"""`flowgen schedule RECIPE... [--once] [--set K=V]`: run each recipe when its `schedule:` is due
(flowgen.run.schedule). A recipe without `schedule:` among several (`recipes/*.yaml`) is skipped
with a note naming it; a bad recipe, or no schedule at all, is an error before anything runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from flowgen.errors import FlowgenError
from flowgen.run.dtype import dtype_setting
from flowgen.run.schedule import ScheduledRecipe, Scheduler


def schedule_command(
    recipes: Sequence[str],
    once: bool,
    max_batch: int | None = None,
    dtype: str | None = None,
    overrides: Sequence[str] = (),
) -> int:
    """Schedule RECIPES; returns the exit code (--once: 0 all due runs ok, 1 one failed, 2 one was
    refused or bad; the loop: 130 on Ctrl-C). Bad recipes, or none with a `schedule:`, raise
    FlowgenError before anything runs. overrides: --set, applied to every recipe and every run."""
    scheduler = build_scheduler(recipes, max_batch, dtype, overrides)
    return scheduler.once() if once else scheduler.loop()


def build_scheduler(
    recipes: Sequence[str],
    max_batch: int | None = None,
    dtype: str | None = None,
    overrides: Sequence[str] = (),
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = lambda line: click.echo(line, err=True),
) -> Scheduler:
    """The scheduler of RECIPES, each due run going through `flowgen run`'s own path."""
    dtype_setting(dtype)  # a bad --dtype is an error now, not at 3 a.m.
    found = {path: scheduled_recipe(path, overrides) for path in recipes}
    entries = [entry for entry in found.values() if entry is not None]
    unscheduled = [path for path, entry in found.items() if entry is None]
    if not entries:
        missing = "has no `schedule:`" if len(unscheduled) == 1 else "none has a `schedule:`"
        raise FlowgenError(
            f'{", ".join(unscheduled)}: {missing}; add one such as schedule: "0 3 * * *" '
            "(see docs/recipes.md, Schedules)"
        )
    for path in unscheduled:  # `flowgen schedule --once recipes/*.yaml` also matches recipes run by hand
        log(f"schedule: {path}: skipped, it has no `schedule:`")
    folders: dict[Path, str] = {}
    for entry in entries:
        if entry.out_dir in folders:
            raise FlowgenError(
                f"{entry.recipe}: writes to {entry.out_dir} like {folders[entry.out_dir]}; "
                "scheduled recipes need output folders of their own"
            )
        folders[entry.out_dir] = entry.recipe

    def run(entry: ScheduledRecipe) -> int:
        from flowgen.commands.run import run_command  # loads the recipe (and its data) again: new rows count

        return run_command(entry.recipe, None, overrides, None, False, max_batch, dtype)

    return Scheduler(entries, run, clock=clock, sleep=sleep, log=log)


def scheduled_recipe(path: str, overrides: Sequence[str] = ()) -> ScheduledRecipe | None:
    """The schedule of one recipe file with the --set overrides applied (RecipeError for a bad
    recipe), or None when it has no `schedule:`."""
    from flowgen.recipe.api import load_recipe

    recipe = load_recipe(path, overrides)
    if recipe.schedule is None:
        return None
    spec = recipe.schedule
    return ScheduledRecipe(
        recipe=str(path),
        name=recipe.name,
        out_dir=recipe.output_dir(None).resolve(),
        cron=spec.cron.strip(),
        timezone=spec.timezone,
        missed=spec.missed,
    )
