"""Ctrl-C handling: the first SIGINT asks the run to stop after the current batch; a second one
interrupts at once (the manifest stays consistent either way: batches commit atomically)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any


class StopRequest:
    """Set by SIGINT (or by code/tests); the executor checks it between batches."""

    def __init__(self, on_first: Callable[[], None] | None = None):
        self.requested = False
        self.on_first = on_first
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None  # as signal.signal returns it

    def request(self) -> None:
        self.requested = True

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.on_first:
            self.on_first()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
