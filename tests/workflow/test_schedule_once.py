"""`flowgen schedule --once` as cron runs it (issue 18, item 22): it says when each recipe is due next
(it printed nothing when nothing was due), `--once recipes/*.yaml` skips the recipes without a
`schedule:` with a note instead of refusing them all, and `--set` works as for `run`."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from flowgen.cli import main
from flowgen.commands.schedule import build_scheduler
from tests.workflow.fake_clock import FakeClock, at
from tests.workflow.incremental_recipe import write_recipe, write_rows


def recipe_in(folder: Path, schedule: str | None) -> Path:
    folder.mkdir()
    write_rows(folder, [("A-1", "white sneaker")])
    return write_recipe(folder, extra=f"schedule: {schedule}" if schedule else "")


def test_once_with_nothing_due_says_when_each_recipe_runs_next(tmp_path):
    daily = recipe_in(tmp_path / "daily", "{cron: '0 3 * * *', missed: skip}")
    berlin = recipe_in(tmp_path / "berlin", "{cron: '30 6 * * 1', timezone: Europe/Berlin, missed: skip}")
    clock, log = FakeClock(at(1, 10)), []  # Tuesday 1 December 2026, 10:00 UTC
    scheduler = build_scheduler([str(daily), str(berlin)], clock=clock, sleep=clock.sleep, log=log.append)
    assert scheduler.once() == 0  # both last due times were missed: skipped (missed: skip)
    log.clear()
    assert scheduler.once() == 0
    assert log == ["schedule: nightly: nothing due now; next run 2026-12-02 03:00 UTC",
                   "schedule: nightly: nothing due now; next run 2026-12-07 06:30 Europe/Berlin"]


def test_once_from_cron_with_a_glob_skips_recipes_without_a_schedule_and_runs_the_others(tmp_path, engine):
    by_hand = recipe_in(tmp_path / "a-by-hand", None)
    nightly = recipe_in(tmp_path / "b-nightly", "{cron: '0 3 1 1 *', missed: run}")  # long past: missed, runs now
    result = CliRunner().invoke(main, ["schedule", "--once", str(by_hand), str(nightly)])
    assert result.exit_code == 0, result.output
    assert f"schedule: {by_hand}: skipped, it has no `schedule:`\n" in result.stderr
    assert "schedule: nightly: running for" in result.stderr and engine == ["photo of white sneaker"]
    assert re.search(r"schedule: nightly: next run \d{4}-01-01 03:00 UTC\n$", result.stderr)

    again = CliRunner().invoke(main, ["schedule", "--once", str(by_hand), str(nightly)])
    assert again.exit_code == 0 and again.stdout == "" and engine == ["photo of white sneaker"]
    assert re.search(r"schedule: nightly: nothing due now; next run \d{4}-01-01 03:00 UTC\n$", again.stderr)


def test_once_with_no_scheduled_recipe_at_all_is_refused_naming_them(tmp_path):
    first, second = recipe_in(tmp_path / "one", None), recipe_in(tmp_path / "two", None)
    result = CliRunner().invoke(main, ["schedule", "--once", str(first), str(second)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (f'error: {first}, {second}: none has a `schedule:`; add one such as schedule: "0 3 * * *" '
                             "(see docs/recipes.md, Schedules)\n")


def test_schedule_takes_set_like_run(tmp_path, engine):
    recipe = recipe_in(tmp_path / "nightly", None)  # --set gives it its schedule, and changes what runs
    result = CliRunner().invoke(main, ["schedule", "--once", str(recipe), "--set", "schedule.cron=0 3 1 1 *",
                                       "--set", "task.positivePrompt=sketch of {product.name}"])
    assert result.exit_code == 0, result.output
    assert engine == ["sketch of white sneaker"]

    bad = CliRunner().invoke(main, ["schedule", "--once", str(recipe), "--set", "task.steps=0"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: task.steps: must be an integer between 1 and")
