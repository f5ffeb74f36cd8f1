"""Independent device programs side by side on the CPU backend, one per host thread.

XLA:CPU spreads little of a small convolutional program (the VAE at 256²: 32- and 64-channel
convolutions) over the cores: its YNNPACK convolutions run on one thread at these sizes, and two
programs dispatched from one host thread run one after the other. Called from different host
threads, they run at the same time. So on the CPU backend, work made of independent programs (the
images of a VAE batch, the references of a set) is run one program per thread of a pool as wide as
the cores this process may use. Memory: at most one program per item at a time, as the whole batch
in one program would hold anyway.

bench/RESULTS.md "Pipeline": a VAE decode of 2 images at 256², 242 -> 183 ms; 4 reference encodes
262 -> 195 ms (2 cores).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import jax

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def host_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def side_by_side(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(item) for item in items], each result ready; on the CPU backend with more than one core and
    item, the calls run on a pool of host threads at once."""
    if len(items) < 2 or host_cores() < 2 or jax.default_backend() != "cpu":
        return [jax.block_until_ready(fn(item)) for item in items]
    return list(_threads().map(lambda item: jax.block_until_ready(fn(item)), items))


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=host_cores(), thread_name_prefix="flowgen-host")
        return _pool
