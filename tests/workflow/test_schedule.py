"""`flowgen schedule`: due runs on an injected clock (no real waiting), incremental rows, the run
lock refusing an overlapping start, the missed-runs policy, Ctrl-C."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen.cli import main
from flowgen.commands.schedule import build_scheduler
from flowgen.run.lock import RunLock
from flowgen.run.manifest import Manifest
from flowgen.run.schedule import ScheduledRecipe, Scheduler
from tests.workflow.fake_clock import FakeClock, at
from tests.workflow.incremental_recipe import write_recipe, write_rows


def nightly(tmp_path: Path, missed: str = "skip", cron: str = "0 3 * * *", zone: str = "UTC") -> Path:
    write_rows(tmp_path, [("A-1", "white sneaker"), ("B-2", "brown boot")])
    return write_recipe(tmp_path, extra=f"schedule: {{cron: '{cron}', timezone: {zone}, missed: {missed}}}")


def schedule_runs(tmp_path: Path) -> list[tuple[float, str]]:
    with Manifest(tmp_path / "out" / "nightly", create=False) as manifest:
        return [(row["due_at"], row["outcome"]) for row in manifest.schedule_runs()]


def test_two_due_runs_with_rows_added_in_between_render_only_the_new_rows(tmp_path, engine, capsys):
    recipe = nightly(tmp_path)
    clock = FakeClock(at(1, 2, 50))

    def between_runs(now):
        if now >= at(1, 4) and not (tmp_path / "added").exists():
            (tmp_path / "added").touch()
            write_rows(tmp_path, [("A-1", "white sneaker"), ("B-2", "brown boot"), ("C-3", "red sandal")])
        if now >= at(2, 4):
            raise KeyboardInterrupt  # Ctrl-C while waiting for the third night

    clock.on_sleep = between_runs
    scheduler = build_scheduler([str(recipe)], clock=clock, sleep=clock.sleep)
    assert scheduler.loop() == 130
    assert sorted(engine[:2]) == ["photo of brown boot", "photo of white sneaker"]  # night 1
    assert engine[2:] == ["photo of red sandal"]  # night 2: the new row only
    assert schedule_runs(tmp_path) == [(at(1, 3), "ok"), (at(2, 3), "ok")]
    log = capsys.readouterr().err
    assert "skipped the due time 2026-11-30 03:00 UTC (missed: skip)" in log  # before the first night: never ran
    assert "next run nightly at 2026-12-02 03:00 UTC" in log and "schedule: interrupted" in log
    assert sum(clock.slept) == pytest.approx(at(2, 4) - at(1, 2, 50))  # no real waiting, in steps of at most a minute


def test_an_overlapping_start_is_refused_and_the_scheduler_keeps_going(tmp_path, engine, capsys):
    recipe = nightly(tmp_path)
    out = tmp_path / "out" / "nightly"
    clock = FakeClock(at(1, 3, 0, 30))
    assert build_scheduler([str(recipe)], clock=clock, sleep=clock.sleep).once() == 0  # night 1 ran
    engine.clear()
    held = RunLock(out, "yesterdays-run")
    held.__enter__()  # the previous run still holds the folder
    try:
        clock.now = at(2, 3, 0, 20)
        assert build_scheduler([str(recipe)], clock=clock, sleep=clock.sleep).once() == 2
        assert "refused:" in capsys.readouterr().err and engine == []

        def later(now):
            if now >= at(3, 4) and held._fd is not None:
                held.__exit__(None, None, None)  # yesterday's run ends
            if now >= at(4, 4):
                raise KeyboardInterrupt

        clock.on_sleep = later
        assert build_scheduler([str(recipe)], clock=clock, sleep=clock.sleep).loop() == 130
    finally:
        held.__exit__(None, None, None)
    log = capsys.readouterr().err
    assert "nightly: refused:" in log and "run yesterdays-run" in log and "nightly: ok (exit 0)" in log
    assert schedule_runs(tmp_path) == [(at(1, 3), "ok"), (at(2, 3), "refused"), (at(3, 3), "refused"), (at(4, 3), "ok")]


@pytest.mark.parametrize("missed", ["run", "skip"])
def test_missed_due_times_run_once_or_are_skipped(tmp_path, engine, missed, capsys):
    recipe = nightly(tmp_path, missed=missed)
    clock = FakeClock(at(1, 3, 1))
    assert build_scheduler([str(recipe)], clock=clock, sleep=clock.sleep).once() == 0  # night 1, on time
    write_rows(tmp_path, [("A-1", "white sneaker"), ("B-2", "brown boot"), ("C-3", "red sandal")])
    engine.clear()
    clock.now = at(3, 12)  # nobody ran the scheduler on nights 2 and 3
    scheduler = build_scheduler([str(recipe)], clock=clock, sleep=clock.sleep)
    assert scheduler.once() == 0
    if missed == "run":
        assert engine == ["photo of red sandal"]  # once, not once per missed night
        assert schedule_runs(tmp_path) == [(at(1, 3), "ok"), (at(3, 3), "ok")]
    else:
        assert engine == []
        assert schedule_runs(tmp_path) == [(at(1, 3), "ok"), (at(3, 3), "skipped")]
    clock.now = at(3, 12, 5)
    assert scheduler.once() == 0 and len(schedule_runs(tmp_path)) == 2  # dealt with: not again
    clock.now = at(4, 3, 0, 40)  # the next night is on time under either policy
    assert build_scheduler([str(recipe)], clock=clock, sleep=clock.sleep).once() == 0
    assert schedule_runs(tmp_path)[-1] == (at(4, 3), "ok")
    assert engine == ["photo of red sandal"]  # whichever night rendered it, only once


def test_an_interrupted_run_is_due_again_after_a_restart(tmp_path):
    out = tmp_path / "out"
    Manifest(out).close()
    codes = [130, 0]
    entry = ScheduledRecipe(recipe="r.yaml", name="r", out_dir=out, cron="0 3 * * *")
    clock = FakeClock(at(1, 3, 2))
    ran = []

    def run(e):
        ran.append(clock.now)
        return codes.pop(0)

    assert Scheduler([entry], run, clock=clock, sleep=clock.sleep, log=lambda line: None).once() == 130
    clock.now = at(1, 3, 4)
    assert Scheduler([entry], run, clock=clock, sleep=clock.sleep, log=lambda line: None).once() == 0
    assert ran == [at(1, 3, 2), at(1, 3, 4)]
    with Manifest(out) as manifest:
        assert [r["outcome"] for r in manifest.schedule_runs()] == ["interrupted", "ok"]
        assert manifest.last_scheduled_due() == at(1, 3)


def test_due_times_follow_the_schedules_time_zone():
    berlin = ScheduledRecipe(recipe="r.yaml", name="r", out_dir=Path("."), cron="0 3 * * *", timezone="Europe/Berlin")
    assert berlin.next_due(at(3, 1, 30)) == at(3, 2)  # 03:00 in Berlin is 02:00 UTC in winter
    summer = datetime(2026, 7, 1, 0, 30, tzinfo=UTC).timestamp()
    assert berlin.next_due(summer) == datetime(2026, 7, 1, 1, 0, tzinfo=UTC).timestamp()  # and 01:00 in summer
    assert berlin.latest_due(at(3, 2)) == at(3, 2)  # a due time exactly now is due now
    assert berlin.latest_due(at(3, 1, 59, 59)) == at(2, 2)
    assert berlin.shown(at(3, 2)) == "2026-12-03 03:00 Europe/Berlin"


def test_flowgen_schedule_once_from_the_command_line(tmp_path, engine):
    # yearly on 1 January: whenever this test runs, that due time is long past and none is near
    recipe = nightly(tmp_path, missed="run", cron="0 3 1 1 *")
    first = CliRunner().invoke(main, ["schedule", "--once", str(recipe)])
    assert first.exit_code == 0, first.output
    assert "(missed; run once now)" in first.stderr and "2 rendered" in first.stdout
    again = CliRunner().invoke(main, ["schedule", "--once", str(recipe)])
    assert again.exit_code == 0 and again.stdout == "" and len(engine) == 2  # nothing due any more

    plain = write_recipe(tmp_path)  # no schedule:
    refused = CliRunner().invoke(main, ["schedule", "--once", str(plain)])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr == f'error: {plain}: has no `schedule:`; add one such as schedule: "0 3 * * *" (see docs/recipes.md, Schedules)\n'


def test_a_recipe_whose_data_breaks_is_reported_and_the_next_night_runs(tmp_path, engine, capsys):
    recipe = nightly(tmp_path)
    clock = FakeClock(at(1, 3, 1))
    scheduler = build_scheduler([str(recipe)], clock=clock, sleep=clock.sleep)  # a long-running scheduler
    assert scheduler.once() == 0
    (tmp_path / "products.csv").write_text("sku,name\nA-1,white sneaker,extra cell\n")
    clock.now = at(2, 3, 1)
    assert scheduler.once() == 2
    assert "nightly: error: datasets.products.csv: line 2 of products.csv has 3 cells, the header has 2" in capsys.readouterr().err
    write_rows(tmp_path, [("A-1", "white sneaker"), ("C-3", "red sandal")])
    clock.now = at(3, 3, 1)
    assert scheduler.once() == 0
    assert [outcome for _, outcome in schedule_runs(tmp_path)] == ["ok", "error", "ok"]
    assert engine[-1:] == ["photo of red sandal"]


def test_the_example_nightly_recipe_is_scheduled_at_three_in_berlin():
    from flowgen.commands.schedule import scheduled_recipe

    entry = scheduled_recipe(str(Path(__file__).parents[2] / "recipes" / "nightly.yaml"))
    assert (entry.cron, entry.timezone, entry.missed) == ("0 3 * * *", "Europe/Berlin", "run")
    assert entry.next_due(at(3, 12)) == at(4, 2)


@pytest.mark.parametrize("missed", ["run", "skip"])
def test_due_times_passed_during_a_long_run_follow_the_missed_policy(tmp_path, missed):
    out = tmp_path / "out"
    Manifest(out).close()
    entry = ScheduledRecipe(recipe="r.yaml", name="r", out_dir=out, cron="0 * * * *", missed=missed)  # hourly
    clock = FakeClock(at(1, 3))
    started = []

    def long_run(e):
        started.append(clock.now)
        if len(started) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third run
        clock.now += 2.5 * 3600  # longer than the interval: two due times pass meanwhile
        return 0

    assert Scheduler([entry], long_run, clock=clock, sleep=clock.sleep, log=lambda line: None).loop() == 130
    with Manifest(out) as manifest:
        outcomes = [(row["due_at"], row["outcome"]) for row in manifest.schedule_runs()]
    if missed == "run":  # 05:00 was missed while 03:00 ran: run once, right away; then 08:00 is on time
        assert started == [at(1, 3), at(1, 5, 30), at(1, 8)]
        assert outcomes == [(at(1, 3), "ok"), (at(1, 5), "ok")]
    else:  # the missed ones are skipped and the next due times run on time
        assert started == [at(1, 3), at(1, 6), at(1, 9)]
        assert outcomes == [(at(1, 3), "ok"), (at(1, 5), "skipped"), (at(1, 6), "ok"), (at(1, 8), "skipped")]
