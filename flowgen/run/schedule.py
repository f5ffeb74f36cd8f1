"""Run recipes when their `schedule:` is due: the loop behind `flowgen schedule`.

When a recipe is due (evaluated with croniter, in the schedule's time zone):
- Its latest due time at or before now is what matters (DUE). It was dealt with when the manifest
  of the recipe's output folder records that due time (table `schedule_runs`; an interrupted run
  does not count, so it is due again after a restart).
- A due time at most ON_TIME_SECONDS old is on time: it runs. An older one was missed (no scheduler
  was running then, or the previous run took longer): `missed: run` runs once now, however many due
  times were missed; `missed: skip` records it as skipped and waits for the next one. A recipe the
  scheduler never ran counts as having missed its last due time.
- The run is the normal run path (the caller's `run` function), so the output folder's run lock
  refuses a start while another run holds the folder: that is logged and recorded ("refused"),
  and the scheduler goes on with the next due time.

Time comes from an injected clock and waiting from an injected sleep (tests use fake ones). The
loop sleeps at most MAX_SLEEP_SECONDS at a time and re-reads the clock, so a suspended machine or
a clock change does not oversleep a due time; Ctrl-C ends it with 130.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from croniter import croniter

from flowgen.errors import FlowgenError
from flowgen.run.lock import FolderBusy
from flowgen.run.manifest import Manifest, manifest_path

ON_TIME_SECONDS = 300.0  # a due time up to 5 minutes old is on time (timers start a little late)
MAX_SLEEP_SECONDS = 60.0
INTERRUPTED = 130


@dataclass(frozen=True)
class ScheduledRecipe:
    """One recipe to schedule: where it writes, and its `schedule:` values."""

    recipe: str  # the path given on the command line
    name: str
    out_dir: Path
    cron: str
    timezone: str = "UTC"
    missed: str = "run"  # run | skip

    def latest_due(self, now: float) -> float:
        """The latest due time at or before `now` (epoch seconds)."""
        zone = ZoneInfo(self.timezone)
        ahead = croniter(self.cron, datetime.fromtimestamp(now - 1, zone)).get_next(float)
        if ahead <= now:  # croniter is strict: a due time exactly at `now` comes from one second earlier
            return ahead
        return croniter(self.cron, datetime.fromtimestamp(now, zone)).get_prev(float)

    def next_due(self, now: float) -> float:
        """The first due time after `now`."""
        return croniter(self.cron, datetime.fromtimestamp(now, ZoneInfo(self.timezone))).get_next(float)

    def shown(self, when: float) -> str:
        """A due time as the recipe's time zone reads it."""
        return datetime.fromtimestamp(when, ZoneInfo(self.timezone)).strftime(f"%Y-%m-%d %H:%M {self.timezone}")


# the run path: returns run's exit code (0, 1, 130); raises FolderBusy when another run holds the folder
RunFunction = Callable[[ScheduledRecipe], int]


class Scheduler:
    """Due-time bookkeeping and the loop; see the module doc."""

    def __init__(
        self,
        recipes: list[ScheduledRecipe],
        run: RunFunction,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] = print,
    ):
        self.recipes, self.run, self.clock, self.sleep, self.log = recipes, run, clock, sleep, log
        self._handled: dict[Path, float] = {}  # out_dir -> latest due time dealt with in this process

    def due(self, entry: ScheduledRecipe, now: float) -> tuple[float, str] | None:
        """(due time, "on time" | "missed") when `entry` should run now, else None.
        A missed due time under `missed: skip` is recorded as skipped here."""
        due = entry.latest_due(now)
        last = self._last_handled(entry)
        if last is not None and due <= last:
            return None
        if now - due <= ON_TIME_SECONDS:
            return due, "on time"
        if entry.missed == "run":
            return due, "missed"
        self._record(entry, due, now, "skipped", detail="missed while no scheduler ran (missed: skip)")
        self.log(
            f"schedule: {entry.name}: skipped the due time {entry.shown(due)} (missed: skip); "
            f"next {entry.shown(entry.next_due(now))}"
        )
        return None

    def run_due(self) -> list[int]:
        """Run every recipe that is due now, one after another; their exit codes (2: refused or bad
        input, 130: interrupted, which stops the rest)."""
        return list(self._run_due().values())

    def _run_due(self) -> dict[str, int]:
        """run_due's codes by recipe (the path given), for the recipes that ran."""
        codes = {}
        for entry in self.recipes:
            now = self.clock()
            found = self.due(entry, now)
            if found is None:
                continue
            code = codes[entry.recipe] = self._run_one(entry, *found)
            if code == INTERRUPTED:
                break
        return codes

    def once(self) -> int:
        """`flowgen schedule --once`: run what is due now, say when each recipe is due next, exit
        (see exit_code). Without the last lines a --once with nothing due would print nothing."""
        try:
            codes = self._run_due()
        except KeyboardInterrupt:  # a second Ctrl-C during a run: the run's batches are committed
            self.log("schedule: interrupted")
            return INTERRUPTED
        if INTERRUPTED not in codes.values():
            now = self.clock()
            for entry in self.recipes:
                status = "" if entry.recipe in codes else "nothing due now; "
                self.log(f"schedule: {entry.name}: {status}next run {entry.shown(entry.next_due(now))}")
        return exit_code(list(codes.values()))

    def loop(self) -> int:
        """Run what is due, sleep until the next due time, forever; Ctrl-C returns 130."""
        try:
            while True:
                codes = self.run_due()
                if INTERRUPTED in codes:
                    return INTERRUPTED
                if codes:
                    continue  # a due time may have passed while they ran: the missed policy decides
                now = self.clock()
                wake = min(entry.next_due(now) for entry in self.recipes)
                self.log(f"schedule: next run {self._next_label(now)}")
                while (now := self.clock()) < wake:
                    self.sleep(min(MAX_SLEEP_SECONDS, wake - now))
        except KeyboardInterrupt:
            self.log("schedule: interrupted")
            return INTERRUPTED

    def _run_one(self, entry: ScheduledRecipe, due: float, why: str) -> int:
        started = self.clock()
        self.log(
            f"schedule: {entry.name}: running for {entry.shown(due)}"
            + (" (missed; run once now)" if why == "missed" else "")
        )
        try:
            code = self.run(entry)
        except FolderBusy as err:  # the previous run still holds the folder: never two at once
            self.log(f"schedule: {entry.name}: refused: {err}")
            self._record(entry, due, started, "refused", detail=str(err))
            return 2
        except FlowgenError as err:  # e.g. the recipe or its data became invalid: reported, the loop goes on
            self.log(f"schedule: {entry.name}: error: {err}")
            self._record(entry, due, started, "error", detail=str(err))
            return 2
        except Exception as err:  # noqa: BLE001 - a crashed run must not end a scheduler serving other nights
            reason = f"{type(err).__name__}: {err}"
            self.log(f"schedule: {entry.name}: the run crashed: {reason}")
            self._record(entry, due, started, "failed", detail=reason)
            return 1
        outcome = {0: "ok", INTERRUPTED: "interrupted"}.get(code, "failed")
        self._record(entry, due, started, outcome, finished_at=self.clock())
        self.log(f"schedule: {entry.name}: {outcome} (exit {code})")
        return code

    def _last_handled(self, entry: ScheduledRecipe) -> float | None:
        recorded = None
        if manifest_path(entry.out_dir).exists():
            with Manifest(entry.out_dir, create=False) as manifest:
                recorded = manifest.last_scheduled_due()
        mine = self._handled.get(entry.out_dir)
        return max((t for t in (recorded, mine) if t is not None), default=None)

    def _record(
        self,
        entry: ScheduledRecipe,
        due: float,
        started: float,
        outcome: str,
        *,
        detail: str | None = None,
        finished_at: float | None = None,
    ) -> None:
        """Note the due time as dealt with (in memory, and in the folder's manifest when it has one:
        the scheduler never creates an output folder of its own)."""
        if outcome != "interrupted":
            self._handled[entry.out_dir] = due
        if manifest_path(entry.out_dir).exists():
            with Manifest(entry.out_dir, create=False) as manifest:
                manifest.record_schedule_run(due, started, outcome, detail=detail, finished_at=finished_at)

    def _next_label(self, now: float) -> str:
        entry = min(self.recipes, key=lambda e: e.next_due(now))
        return f"{entry.name} at {entry.shown(entry.next_due(now))}"


def exit_code(codes: list[int]) -> int:
    """130 if interrupted, else 2 if any start was refused (or its recipe was bad), else 1 if any run
    failed, else 0 (also when nothing was due)."""
    for code in (INTERRUPTED, 2, 1):
        if code in codes:
            return code
    return 0 if not codes or all(c == 0 for c in codes) else 1
