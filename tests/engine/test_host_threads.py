"""runtime/host_threads: independent programs run side by side on host threads on the CPU backend."""

from __future__ import annotations

import threading

import jax.numpy as jnp
import pytest

from flowgen.engine.runtime import host_threads


@pytest.mark.skipif(host_threads.host_cores() < 2, reason="needs two cores")
def test_calls_run_at_the_same_time_on_the_cpu():
    meet = threading.Barrier(2, timeout=20)  # passes only if both calls are running at once

    def call(x):
        meet.wait()
        return x + 1

    assert [int(y) for y in host_threads.side_by_side(call, [jnp.int32(1), jnp.int32(2)])] == [2, 3]


def test_one_item_runs_in_the_callers_thread():
    caller = threading.get_ident()
    seen = []
    host_threads.side_by_side(lambda x: seen.append(threading.get_ident()) or x, [jnp.int32(1)])
    assert seen == [caller]
