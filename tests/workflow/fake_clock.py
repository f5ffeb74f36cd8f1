"""An injected clock for the scheduler tests: no real waiting, sleeping moves the clock."""

from __future__ import annotations

from datetime import UTC, datetime

from flowgen.run.schedule import MAX_SLEEP_SECONDS


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> float:
    """December `day` 2026, UTC, as epoch seconds."""
    return datetime(2026, 12, day, hour, minute, second, tzinfo=UTC).timestamp()


class FakeClock:
    """time.time and time.sleep for the scheduler: sleeping moves the clock; `on_sleep` hooks run then."""

    def __init__(self, now: float):
        self.now = now
        self.slept: list[float] = []
        self.on_sleep = lambda now: None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert 0 < seconds <= MAX_SLEEP_SECONDS
        self.slept.append(seconds)
        self.now += seconds
        self.on_sleep(self.now)
