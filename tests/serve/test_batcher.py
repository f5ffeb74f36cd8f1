"""The serve batcher: requests from many threads share engine calls, and each image is the one
`flowgen run` renders for its job and seed at that batch size and position."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, wait

import numpy as np
import pytest

from flowgen.plan.batching import make_batches
from flowgen.plan.job import Job
from flowgen.plan.model import PlannedItem, PlannedResult
from flowgen.run.engine import FakeEngine
from flowgen.run.render import render_batch
from flowgen.serve.batcher import Batcher, BatcherClosed, BatcherResult

TIMEOUT = 30  # seconds any one wait may take before a test fails (CPU is shared)


def job(prompt: str = "a fox", width: int = 64, steps: int = 2, refs: tuple[str, ...] = ()) -> Job:
    return Job.from_task({"positivePrompt": prompt, "width": width, "height": 64, "steps": steps},
                         guidance=None, references=refs, reference_hashes=tuple(f"sha-{r}" for r in refs))


def reference(name: str) -> np.ndarray:
    """A small decoded reference image whose pixels depend on its name."""
    return np.full((16, 16, 3), sum(name.encode()) % 256, dtype=np.uint8)


class CountingFake(FakeEngine):
    """A FakeEngine that can be told to fail calls whose first prompt is "boom"."""

    def generate_batch(self, request):
        if request.prompts[0] == "boom":
            self.calls.append(request)
            raise RuntimeError("engine exploded")
        return super().generate_batch(request)


def results(futures: list[Future]) -> list[BatcherResult]:
    done, pending = wait(futures, timeout=TIMEOUT)
    assert not pending, f"{len(pending)} requests never finished"
    return [f.result() for f in futures]


def test_many_threads_share_batches_and_nothing_is_lost_or_duplicated():
    engine = FakeEngine(delay_per_image=0.002)
    batcher = Batcher(lambda model: engine, window_s=0.2, max_batch=8)
    start = threading.Barrier(8)
    futures: dict[tuple[int, int], Future] = {}
    lock = threading.Lock()

    def client(number: int) -> None:
        start.wait()
        for index in range(4):
            future = batcher.submit("fake", job(f"client {number} image {index}"), seed=100 * number + index)
            with lock:
                futures[(number, index)] = future

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    keys = sorted(futures)
    got = dict(zip(keys, results([futures[k] for k in keys])))
    batcher.close()

    assert len(got) == 32
    served = [(p, s) for call in engine.calls for p, s in zip(call.prompts, call.seeds)]
    for (number, index), result in got.items():  # each result is its own request's image
        expected = FakeEngine().generate_batch(build_single(job(f"client {number} image {index}"), 100 * number + index))
        assert np.array_equal(result.pixels, expected.images[0])
    real = {(f"client {n} image {i}", 100 * n + i) for n, i in got}
    assert set(served) == real  # every request reached the engine; padding only repeats real rows
    assert sum(len(set(zip(c.prompts, c.seeds))) for c in engine.calls) == 32  # no request ran twice
    stats = batcher.stats()
    assert stats["images"] == 32 and stats["batches"] == len(engine.calls)
    assert stats["mean_batch_size"] == 32 / len(engine.calls) > 1
    assert stats["max_batch_size"] == max(r.batch_size for r in got.values()) <= 8
    assert stats["queue_depth"] == 0
    assert all(len(call.prompts) in (1, 2, 4, 8) for call in engine.calls)


def build_single(one: Job, seed: int, refs: list | None = None):
    from flowgen.run.engine import BatchRequest

    return BatchRequest.for_jobs([(one, seed, refs or [])], 1)


def planned(jobs_and_seeds: list[tuple[Job, int]]) -> list[PlannedResult]:
    """The planner's results for these (job, seed) pairs, one item each, ids in the given order."""
    out = []
    for number, (one, seed) in enumerate(jobs_and_seeds):
        item = PlannedItem(item_id=f"{number:04d}", key=str(number), values={}, task={}, job=one,
                           reference_sizes=(), item_hash=str(number))
        out.append(PlannedResult(item, 0, seed, str(number), f"/nowhere/{number}.png"))
    return out


def executor_images(engine, jobs_and_seeds, max_batch: int, decoded: dict) -> dict[int, tuple[np.ndarray, dict]]:
    """What `flowgen run` renders: submit number -> (pixels, batch size and position), via the
    planner's batches and the executor's engine call."""
    out = {}
    for batch in make_batches(planned(jobs_and_seeds), max_batch):
        rows = [(r.job, r.seed, [decoded[p] for p in r.job.references]) for r in batch.results]
        images = render_batch(engine, rows, batch.size).images
        for position, r in enumerate(batch.results):
            out[int(r.item.item_id)] = (images[position], {"size": batch.size, "position": position})
    return out


def test_a_batch_is_ordered_padded_and_rendered_as_flowgen_run_does():
    """Six requests queued at once (two reference sets, a repeated prompt): one engine call
    padded to 8, rows in the planner's order, each image equal to the run's at that position."""
    decoded = {name: reference(name) for name in ("a.png", "b.png")}
    wanted = [(job("cat", refs=("b.png",)), 1), (job("dog", refs=("a.png",)), 2), (job("cat", refs=("a.png",)), 3),
              (job("cat"), 4), (job("ant", refs=("a.png",)), 5), (job("cat", refs=("a.png",)), 6)]
    engine = FakeEngine()
    with Batcher(lambda model: engine, window_s=0.3, max_batch=8) as batcher:
        futures = [batcher.submit("fake", one, seed, [decoded[p] for p in one.references]) for one, seed in wanted]
        got = results(futures)
    expected = executor_images(FakeEngine(), wanted, 8, decoded)
    assert len(engine.calls) == 1 and len(engine.calls[0].prompts) == 8  # 6 real rows padded to 8
    assert engine.calls[0].prompts == ["ant", "cat", "cat", "dog", "cat", "cat", "cat", "cat"]  # set a.png first
    for number, result in enumerate(got):
        pixels, where = expected[number]
        assert result.batch_size == 6
        assert {k: result.batch_info[k] for k in ("size", "position")} == where
        assert result.batch_info["signature"] == "64x64, 2 steps, no cfg"
        assert np.array_equal(result.pixels, pixels)


def test_different_signatures_or_models_never_share_a_batch():
    engine = FakeEngine()
    models: list[str] = []

    def engine_for(model: str):
        models.append(model)
        return engine

    with Batcher(engine_for, window_s=0.2, max_batch=8) as batcher:
        futures = [batcher.submit("m1", job("x", width=64), 1), batcher.submit("m1", job("y", width=128), 2),
                   batcher.submit("m1", job("z", width=64, steps=3), 3), batcher.submit("m2", job("w", width=64), 4),
                   batcher.submit("m1", job("v", width=64), 5)]
        got = results(futures)
    assert sorted(models) == ["m1", "m2"]  # one engine per model, asked for once
    shapes = sorted((c.width, c.steps, tuple(sorted(set(c.prompts)))) for c in engine.calls)
    assert shapes == [(64, 2, ("v", "x")), (64, 2, ("w",)), (64, 3, ("z",)), (128, 2, ("y",))]
    assert [r.batch_size for r in got] == [2, 1, 1, 1, 2]


def test_a_lone_request_waits_at_most_the_window():
    engine = FakeEngine()
    with Batcher(lambda model: engine, window_s=0.1, max_batch=8) as batcher:
        results([batcher.submit("fake", job("warm up"), 0)])
        start = time.monotonic()
        result = results([batcher.submit("fake", job("alone"), 1)])[0]
        elapsed = time.monotonic() - start
    assert result.batch_size == 1 and result.batch_info["size"] == 1
    assert 0.09 <= elapsed < 0.1 + 1.0  # it waited for company, no longer than the window (+ slack: shared CPU)


def test_a_full_batch_goes_without_waiting_for_the_window():
    engine = FakeEngine()
    with Batcher(lambda model: engine, window_s=20.0, max_batch=4) as batcher:
        start = time.monotonic()
        got = results([batcher.submit("fake", job(f"p{n}"), n) for n in range(4)])
        assert time.monotonic() - start < 10.0
    assert [r.batch_size for r in got] == [4] * 4


def test_an_engine_error_fails_only_its_batch_and_the_worker_keeps_serving():
    engine = CountingFake()
    with Batcher(lambda model: engine, window_s=0.05, max_batch=8) as batcher:
        bad = [batcher.submit("fake", job("boom", width=128), 1), batcher.submit("fake", job("boom", width=128), 2)]
        good = batcher.submit("fake", job("fine"), 3)
        wait(bad + [good], timeout=TIMEOUT)
        for future in bad:
            with pytest.raises(RuntimeError, match="engine exploded"):
                future.result()
        assert good.result().batch_size == 1
        later = results([batcher.submit("fake", job("after"), 4)])[0]  # still serving
        stats = batcher.stats()
    assert later.batch_size == 1
    assert stats["batches"] == 2 and stats["images"] == 2  # the failed call rendered nothing


def test_an_engine_that_cannot_load_fails_its_requests_clearly():
    def engine_for(model: str):
        raise LookupError(f"no model card {model!r}")

    with Batcher(engine_for, window_s=0.01) as batcher:
        future = batcher.submit("nope", job(), 1)
        with pytest.raises(LookupError, match="no model card 'nope'"):
            future.result(timeout=TIMEOUT)


class SlowFake(FakeEngine):
    """Holds its first call until released, so that work queues up behind it."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def generate_batch(self, request):
        self.started.set()
        assert self.release.wait(TIMEOUT)
        return super().generate_batch(request)


@pytest.mark.parametrize("finish", [True, False])
def test_close_finishes_or_fails_queued_work(finish):
    engine = SlowFake()
    batcher = Batcher(lambda model: engine, window_s=0.0, max_batch=8)
    first = batcher.submit("fake", job("first"), 1)
    assert engine.started.wait(TIMEOUT)
    queued = [batcher.submit("fake", job(f"q{n}"), n) for n in range(3)]
    assert batcher.stats()["queue_depth"] == 3
    closer = threading.Thread(target=batcher.close, kwargs={"finish": finish})
    closer.start()
    time.sleep(0.05)
    with pytest.raises(BatcherClosed, match="shutting down"):
        batcher.submit("fake", job("too late"), 9)
    engine.release.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert first.result().batch_size == 1  # the batch on the engine always finishes
    if finish:
        assert [r.batch_size for r in results(queued)] == [3, 3, 3]
    else:
        for future in queued:
            with pytest.raises(BatcherClosed, match="shut down before this task ran"):
                future.result(timeout=TIMEOUT)
    assert batcher.stats()["queue_depth"] == 0


def test_stats_count_real_images_not_padding():
    engine = FakeEngine()
    with Batcher(lambda model: engine, window_s=0.3, max_batch=8) as batcher:
        results([batcher.submit("fake", job(f"a{n}"), n) for n in range(3)])  # 3 real, padded to 4
        results([batcher.submit("fake", job("b"), 9)])
        stats = batcher.stats()
    assert [len(c.prompts) for c in engine.calls] == [4, 1]
    assert stats == {"queue_depth": 0, "batches": 2, "images": 4, "mean_batch_size": 2.0, "max_batch_size": 3}


@pytest.mark.slow
def test_tiny_model_images_equal_the_runs():
    """The embedded tiny model: three requests padded to a batch of 4, one sampling loop, the
    repeated prompt encoded once, pixels equal to the run's."""
    from flowgen.run.engine import PipelineEngine

    engine = PipelineEngine("flux2-klein-tiny")
    def small(prompt):
        return Job.from_task({"positivePrompt": prompt, "width": 128, "height": 128, "steps": 2}, guidance=None)

    wanted = [(small("batcher test: a red fox"), 11), (small("batcher test: a blue car"), 12),
              (small("batcher test: a red fox"), 13)]
    before = dict(engine.pipe.counters)
    with Batcher(lambda model: engine, window_s=0.5, max_batch=4) as batcher:
        got = results([batcher.submit("flowgen:1@1", one, seed) for one, seed in wanted])
    work = {k: engine.pipe.counters[k] - before.get(k, 0) for k in ("text_encode", "denoise")}
    assert work == {"text_encode": 2, "denoise": 1}
    expected = executor_images(engine, wanted, 4, {})
    for number, result in enumerate(got):
        pixels, where = expected[number]
        assert result.batch_size == 3 and {k: result.batch_info[k] for k in ("size", "position")} == where
        assert result.batch_info["reference_layout"] == "none"
        assert np.array_equal(result.pixels, pixels)
