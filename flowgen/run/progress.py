"""Progress reporting: a rich bar on a terminal (items, images/s, ETA), plain lines otherwise.

`step(steps_done, steps)` comes from inside a batch's sampling loop (maybe on another thread).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from rich.progress import TaskID  # rich itself is imported only when a bar is shown


class Progress(Protocol):
    def start(self, total: int, batches: int) -> None: ...

    def step(self, steps_done: int, steps: int) -> None: ...

    def advance(self, done: int, failed: int) -> None: ...

    def note(self, message: str) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    def start(self, total: int, batches: int) -> None: ...

    def step(self, steps_done: int, steps: int) -> None: ...

    def advance(self, done: int, failed: int) -> None: ...

    def note(self, message: str) -> None: ...

    def finish(self) -> None: ...


class PlainProgress:
    """One line per batch: `[12/200] 3.1 img/s, ETA 61s, 0 failed` (logs, CI, pipes), and
    `  step 7/50` inside a batch only when nothing was printed for `step_interval` seconds."""

    def __init__(self, stream: TextIO | None = None, step_interval: float = 30.0):
        self.stream = stream or sys.stderr
        self.step_interval = step_interval
        self.total = self.done = self.failed = 0
        self.t0 = self.last_line = time.perf_counter()

    def start(self, total: int, batches: int) -> None:
        self.total, self.t0 = total, time.perf_counter()
        self._print(f"rendering {total} result(s) in {batches} batch(es)")

    def step(self, steps_done: int, steps: int) -> None:
        if steps_done < steps and time.perf_counter() - self.last_line >= self.step_interval:
            self._print(f"  step {steps_done}/{steps}")

    def advance(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        self._print(f"[{self.done}/{self.total}] {rate:.2f} img/s, ETA {eta:.0f}s, {self.failed} failed")

    def note(self, message: str) -> None:
        self._print(message)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
        self.last_line = time.perf_counter()

    def finish(self) -> None: ...


class RichProgress:
    """A rich progress bar on stderr: results done/total, images/s, ETA, failures, and the
    running batch's sampling step."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.console = Console(stderr=True)
        self.bar = Bar(
            TextColumn("[bold]rendering"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.2f} img/s"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TextColumn("{task.fields[step]}"),
            console=self.console,
            transient=False,
        )
        self.task: TaskID | None = None  # set by start()
        self.t0 = time.perf_counter()
        self.done = self.failed = 0

    def start(self, total: int, batches: int) -> None:
        self.t0 = time.perf_counter()
        self.bar.start()
        self.task = self.bar.add_task("render", total=total, rate=0.0, failed=0, step="")

    def step(self, steps_done: int, steps: int) -> None:
        assert self.task is not None, "start() first"
        self.bar.update(self.task, step=f"step {steps_done}/{steps}")

    def advance(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        elapsed = time.perf_counter() - self.t0
        assert self.task is not None, "start() first"
        self.bar.update(
            self.task, advance=done, rate=self.done / elapsed if elapsed else 0.0, failed=self.failed, step=""
        )

    def note(self, message: str) -> None:
        self.console.print(message)

    def finish(self) -> None:
        self.bar.stop()


def default_progress() -> Progress:
    """Rich on an interactive terminal, plain lines otherwise."""
    return RichProgress() if sys.stderr.isatty() else PlainProgress()
