"""Batches of whole rows for every device of a mesh: `chunk_sizes(n, max_batch, multiple)` (the
planner's batches, `Plan.batch_multiple`) and the serve batcher (`batch_multiple`) pad to multiples
of the mesh's "data" size, and change nothing on one device."""

from __future__ import annotations

from concurrent.futures import wait

import pytest

from flowgen.plan.batching import chunk_sizes
from flowgen.plan.job import Job
from flowgen.run.engine import FakeEngine
from flowgen.serve.batcher import Batcher


@pytest.mark.parametrize("n", range(1, 41))
@pytest.mark.parametrize("max_batch, multiple", [(8, 1), (8, 2), (8, 8), (4, 8), (16, 4), (8, 6)])
def test_every_chunk_is_a_multiple_and_every_result_is_in_one(n, max_batch, multiple):
    chunks = chunk_sizes(n, max_batch, multiple)
    assert sum(count for count, _ in chunks) == n
    for count, size in chunks:
        assert 1 <= count <= size and size % multiple == 0
        assert size <= max(max_batch, multiple) or size % multiple == 0
    padding = sum(size - count for count, size in chunks)
    assert padding < max(multiple, 1) + max(n, 1) // 4 + 1  # a remainder, not a batch of padding per chunk


def test_one_device_batches_as_before():
    for n in range(1, 60):
        assert chunk_sizes(n, 8, 1) == chunk_sizes(n, 8)
    assert chunk_sizes(13, 8) == [(8, 8), (4, 4), (1, 1)]


def test_a_mesh_of_eight_pads_remainders_to_eight():
    assert chunk_sizes(20, 8, 8) == [(8, 8), (8, 8), (4, 8)]
    assert chunk_sizes(5, 8, 8) == [(5, 8)]  # not 4 + 1: each would be padded to 8
    assert chunk_sizes(3, 2, 8) == [(3, 8)]  # --max-batch below the data size is raised to it
    assert chunk_sizes(13, 8, 2) == [(8, 8), (4, 4), (1, 2)]


def test_the_serve_batcher_pads_to_the_mesh():
    engine = FakeEngine()
    batcher = Batcher(lambda model: engine, window_s=0.05, max_batch=8, batch_multiple=4)
    job = Job.from_task({"positivePrompt": "a fox", "width": 64, "height": 64, "steps": 2}, guidance=None)
    futures = [batcher.submit("fake", job, seed=seed) for seed in range(3)]
    done, pending = wait(futures, timeout=30)
    batcher.close()
    assert not pending and all(f.result().pixels is not None for f in futures)
    assert [len(call.prompts) for call in engine.calls] == [4]  # 3 requests, one call of 4 rows
