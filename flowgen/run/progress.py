"""Progress reporting: a rich bar on a terminal (items, images/s, ETA), plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    def start(self, total: int, batches: int) -> None: ...

    def advance(self, done: int, failed: int) -> None: ...

    def note(self, message: str) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    def start(self, total: int, batches: int) -> None: ...

    def advance(self, done: int, failed: int) -> None: ...

    def note(self, message: str) -> None: ...

    def finish(self) -> None: ...


class PlainProgress:
    """One line per batch: `[12/200] 3.1 img/s, ETA 61s, 0 failed` (logs, CI, pipes)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total = self.done = self.failed = 0
        self.t0 = time.perf_counter()

    def start(self, total: int, batches: int) -> None:
        self.total, self.t0 = total, time.perf_counter()
        print(f"rendering {total} result(s) in {batches} batch(es)", file=self.stream, flush=True)

    def advance(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"[{self.done}/{self.total}] {rate:.2f} img/s, ETA {eta:.0f}s, {self.failed} failed", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def finish(self) -> None: ...


class RichProgress:
    """A rich progress bar on stderr: results done/total, images/s, ETA, failures."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.bar = Bar(
            TextColumn("[bold]rendering"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.2f} img/s"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[failed]} failed"),
            console=self.console,
            transient=False,
        )
        self.task = None
        self.t0 = time.perf_counter()
        self.done = self.failed = 0

    def start(self, total: int, batches: int) -> None:
        self.t0 = time.perf_counter()
        self.bar.start()
        self.task = self.bar.add_task("render", total=total, rate=0.0, failed=0)

    def advance(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        elapsed = time.perf_counter() - self.t0
        self.bar.update(self.task, advance=done, rate=self.done / elapsed if elapsed else 0.0, failed=self.failed)

    def note(self, message: str) -> None:
        self.console.print(message)

    def finish(self) -> None:
        self.bar.stop()


def default_progress() -> Progress:
    """Rich on an interactive terminal, plain lines otherwise."""
    return RichProgress() if sys.stderr.isatty() else PlainProgress()
