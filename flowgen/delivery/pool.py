"""Many deliveries at once: a bounded thread pool sharing one httpx.Client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import httpx

T = TypeVar("T")

DEFAULT_WORKERS = 4
USER_AGENT = "flowgen-delivery"


def make_client(max_workers: int = DEFAULT_WORKERS) -> httpx.Client:
    """A client for deliveries: no redirect following (send() vets each hop itself), and a
    connection pool as large as the worker pool so no worker waits for a connection."""
    return httpx.Client(
        follow_redirects=False,
        limits=httpx.Limits(max_connections=max_workers, max_keepalive_connections=max_workers),
        headers={"User-Agent": USER_AGENT},
    )


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
