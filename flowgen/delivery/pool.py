"""Many deliveries at once: bounded thread pools over one guarded httpx.Client.

DeliveryPool runs a list of jobs and returns their results (a run's deliveries). Lanes runs jobs
in the background with a limit per lane (a destination, an API key): a receiver that never answers
holds at most its lane's threads, and every other lane's jobs keep going (the server's deliveries).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

from flowgen.net.policy import DestinationPolicy
from flowgen.net.transport import guarded_client

T = TypeVar("T")

DEFAULT_WORKERS = 4
USER_AGENT = "flowgen-delivery"


def make_client(max_workers: int = DEFAULT_WORKERS, destinations: DestinationPolicy | None = None) -> httpx.Client:
    """A client for deliveries: connections only where `destinations` allows (default: public
    addresses plus $FLOWGEN_ALLOW_HOSTS), no redirect following (send() vets each hop itself), and a
    connection pool as large as the worker pool so no worker waits for a connection."""
    policy = destinations if destinations is not None else DestinationPolicy.from_env()
    return guarded_client(policy, max_connections=max_workers, headers={"User-Agent": USER_AGENT})


def origin(url: str | None) -> str:
    """scheme://host:port of a URL: the lane a delivery to it runs in."""
    parts = urlsplit(url or "")
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{parts.port or ''}"


class DeliveryPool:
    """Runs delivery jobs, at most `max_workers` at a time, on one shared client.

        with DeliveryPool() as pool:
            deliveries = pool.run([lambda c: post_result(c, url, p, secret=s) for p in payloads])

    A job is any callable taking the client. Closing the pool closes the client only if the
    pool created it.
    """

    def __init__(self, max_workers: int = DEFAULT_WORKERS, client: httpx.Client | None = None):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, not {max_workers}")
        self.max_workers = max_workers
        self._owns_client = client is None
        self.client = make_client(max_workers) if client is None else client
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="flowgen-delivery")

    def run(self, jobs: Iterable[Callable[[httpx.Client], T]]) -> list[T]:
        """Run every job; results in submission order. Every job finishes before this returns; if
        any raised, the first such exception (in submission order) is re-raised then."""
        futures = [self._executor.submit(job, self.client) for job in jobs]
        errors = [f.exception() for f in futures]  # waits for all, so none is left running
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> DeliveryPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Lanes:
    """Background jobs, each in one or more lanes with a limit each; a job starts only while every
    one of its lanes has fewer jobs running than its limit, and at most `max_workers` run in all.
    Waiting jobs start in submission order as room frees up; none holds a thread while it waits.

        lanes = Lanes(max_workers=64)
        lanes.submit(job, {("destination", "https://hooks.example:"): 4, ("key", "ab12"): 8})
        lanes.close()   # waits for every job, queued ones included
    """

    def __init__(self, max_workers: int):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, not {max_workers}")
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="flowgen-lane")
        self._max_workers = max_workers
        self._running: dict[Hashable, int] = {}
        self._waiting: deque[tuple[Callable[[], None], dict[Hashable, int]]] = deque()
        self._busy = 0
        self._lock = threading.Condition()

    def submit(self, job: Callable[[], None], limits: Mapping[Hashable, int]) -> None:
        """Run `job` once each lane in `limits` ({lane: its limit}) has room."""
        if any(limit < 1 for limit in limits.values()):
            raise ValueError(f"lane limits must be >= 1, not {dict(limits)}")
        with self._lock:
            self._waiting.append((job, dict(limits)))
            self._start_what_fits()

    def running(self, lane: Hashable) -> int:
        with self._lock:
            return self._running.get(lane, 0)

    def close(self) -> None:
        """Wait until every submitted job has run."""
        with self._lock:
            self._lock.wait_for(lambda: not self._waiting and not self._busy)
        self._executor.shutdown(wait=True)

    def _start_what_fits(self) -> None:  # under the lock
        kept: deque = deque()
        while self._waiting and self._busy < self._max_workers:
            job, limits = self._waiting.popleft()
            if all(self._running.get(lane, 0) < limit for lane, limit in limits.items()):
                for lane in limits:
                    self._running[lane] = self._running.get(lane, 0) + 1
                self._busy += 1
                self._executor.submit(self._run, job, tuple(limits))
            else:
                kept.append((job, limits))
        kept.extend(self._waiting)
        self._waiting = kept

    def _run(self, job: Callable[[], None], lanes: tuple[Hashable, ...]) -> None:
        try:
            job()
        finally:
            with self._lock:
                for lane in lanes:
                    self._running[lane] -= 1
                    if not self._running[lane]:
                        del self._running[lane]
                self._busy -= 1
                self._start_what_fits()
                self._lock.notify_all()
