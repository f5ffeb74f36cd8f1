"""Continuous batching for `flowgen serve`: requests from every connection share sampling loops.

One worker thread owns the engines. `submit` queues a (model, job, seed, decoded references)
request and returns a Future; requests with the same model and shape signature (`Job.signature`,
the key the recipe planner batches by) wait together until `max_batch` of them are queued or the
oldest has waited `window_s`, then run as one engine call. What makes a batch replayable is kept
as in `flowgen run` (flowgen.run.executor):

* a batch is cut and padded with `chunk_sizes` (powers of two, padding copies of the last row,
  `BatchRequest.for_jobs`): 3 waiting requests run padded to 4, 5 run as 4 now and 1 next (that
  one, past its window, goes with whoever arrived meanwhile);
* rows are ordered as the planner orders them (`_ordered`): largest reference set first, each
  contiguous, then by prompt, so a shared set runs with one K/V and neighbours share prompts
  (the engine computes a reference set's K/V and a prompt's embedding once and keeps them for
  later batches: flowgen.engine.references.cache, prompt_cache);
* each result carries the executor's `batch` record (size, position, layout), so its pixels are
  what `flowgen run` renders for that job and seed at that size and position, and regen replays it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np

from flowgen.plan.batching import batch_order, chunk_sizes, next_pow2, round_up
from flowgen.plan.job import Job
from flowgen.run.engine import Engine
from flowgen.run.render import render_batch


class BatcherClosed(RuntimeError):
    """The batcher stopped before (or instead of) running a request."""


@dataclass(frozen=True)
class BatcherResult:
    pixels: np.ndarray  # uint8 HxWx3
    engine_seconds: float  # this image's share of the batch's engine time (engine time / padded size, as runs count it)
    batch_size: int  # how many real requests shared its sampling loop
    batch_info: dict  # what regen needs to replay it: the executor's `batch` record
    engine: Engine | None = None  # the engine that rendered it (the face pass reuses it, under engine_lock)


@dataclass
class _Request:
    model: str
    job: Job
    seed: int
    references: list
    future: Future
    arrived: float  # time.monotonic() at submit
    number: int  # submit order: ties in a batch's ordering, fairness between groups


@dataclass
class _Counts:
    batches: int = 0  # engine calls that rendered (a failed call counts nowhere)
    images: int = 0  # images they rendered for requests (padding slots not counted)
    max_batch_size: int = 0


GroupKey = tuple  # (model, Job.signature)


class Batcher:
    """See the module doc. Thread-safe: submit, stats and close may be called from any thread."""

    def __init__(
        self,
        engine_for: Callable[[str], Engine],
        *,
        window_s: float = 0.05,
        max_batch: int = 8,
        batch_multiple: int = 1,
    ):
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0; got {window_s}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}")
        self._engine_for = engine_for
        self._engines: dict[str, Engine] = {}  # only the worker thread touches these
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self.batch_multiple = int(batch_multiple)  # the engine's device mesh "data" size: whole rows per device
        self._groups: dict[GroupKey, list[_Request]] = defaultdict(list)  # queued, in arrival order
        self._queued = 0
        self._numbers = itertools.count()
        self._counts = _Counts()
        self._wake = threading.Condition()
        # one engine call at a time: post-passes on results (the server's face pass) share these
        # engines from other threads, and an engine's caches are not made for concurrent calls
        self.engine_lock = threading.RLock()
        self._closing = False  # no new submits; the worker drains the queue, then stops
        self._worker = threading.Thread(target=self._serve, name="flowgen-batcher", daemon=True)
        self._worker.start()

    # --- any thread ---------------------------------------------------------------------------

    def submit(self, model: str, job: Job, seed: int, references: list | None = None) -> Future:
        """Queue one image; the Future gives a BatcherResult or raises the engine's exception."""
        future: Future = Future()
        with self._wake:
            if self._closing:
                raise BatcherClosed("the server is shutting down: no new tasks are accepted")
            request = _Request(
                model, job, int(seed), list(references or ()), future, time.monotonic(), next(self._numbers)
            )
            self._groups[(model, job.signature)].append(request)
            self._queued += 1
            self._wake.notify()
        return future

    def stats(self) -> dict:
        with self._wake:
            counts = self._counts
            return {
                "queue_depth": self._queued,
                "batches": counts.batches,
                "images": counts.images,
                "mean_batch_size": counts.images / counts.batches if counts.batches else 0.0,
                "max_batch_size": counts.max_batch_size,
            }

    def close(self, finish: bool = True) -> None:
        """Stop. finish: run everything queued first; else fail the queued futures with
        BatcherClosed (a batch already on the engine finishes either way). Idempotent."""
        with self._wake:
            self._closing = True
            dropped = [] if finish else self._take_all()
            self._wake.notify_all()
        for request in dropped:
            _fail(request.future, BatcherClosed("the server shut down before this task ran"))
        if self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close(finish=exc[0] is None)

    # --- the worker thread --------------------------------------------------------------------

    def _serve(self) -> None:
        batch: list[_Request] | None = []
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except BaseException as err:  # a bug here must not leave clients waiting forever
            with self._wake:
                self._closing = True
                left = (batch or []) + self._take_all()
            for request in left:
                _fail(request.future, BatcherClosed(f"the batch scheduler stopped: {type(err).__name__}: {err}"))
            raise

    def _next_batch(self) -> list[_Request] | None:
        """Block until a group is full or its oldest request's window is over; take its batch
        (None once closing and nothing is queued)."""
        with self._wake:
            while True:
                now = time.monotonic()
                ready, next_deadline = None, None
                for key, members in self._groups.items():
                    deadline = members[0].arrived + self.window_s
                    if len(members) >= self.max_batch or deadline <= now or self._closing:
                        if ready is None or members[0].number < self._groups[ready][0].number:
                            ready = key  # the group whose oldest request came first
                    elif next_deadline is None or deadline < next_deadline:
                        next_deadline = deadline
                if ready is not None:
                    return self._take(ready)
                if self._closing:
                    return None
                self._wake.wait(None if next_deadline is None else next_deadline - now)

    def _take(self, key: GroupKey) -> list[_Request]:
        """The oldest requests of a group, as many as its first chunk holds (the rest stay queued)."""
        members = self._groups[key]
        count, _ = chunk_sizes(min(len(members), self.max_batch), self.max_batch, self.batch_multiple)[0]
        taken, rest = members[:count], members[count:]
        if rest:
            self._groups[key] = rest
        else:
            del self._groups[key]
        self._queued -= len(taken)
        return taken

    def _take_all(self) -> list[_Request]:
        left = [request for members in self._groups.values() for request in members]
        self._groups.clear()
        self._queued = 0
        return left

    def _run(self, batch: list[_Request]) -> None:
        """One engine call for `batch` (one group's requests); resolves every future in it."""
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]  # cancelled ones drop out
        batch = batch_order(live, job_of=lambda r: r.job, then=lambda r: r.number)
        if not batch:
            return
        # the padded size chunk_sizes gave the taken chunk (still a power of two <= max_batch when
        # cancellations shrank it)
        size = round_up(next_pow2(len(batch)), self.batch_multiple)
        try:
            with self.engine_lock:
                engine = self.engine(batch[0].model)
                rendered = render_batch(engine, [(r.job, r.seed, r.references) for r in batch], size)
        except Exception as err:  # fails this batch only; the worker keeps serving
            for r in batch:
                _fail(r.future, err)
            return
        self._count(len(batch))
        for position, r in enumerate(batch):
            r.future.set_result(
                BatcherResult(
                    pixels=rendered.images[position],
                    engine_seconds=rendered.seconds_per_image,
                    batch_size=len(batch),
                    batch_info=rendered.batch_record(r.job, position),
                    engine=engine,
                )
            )

    def engine(self, model: str) -> Engine:
        """The engine of `model`, made on first use (the server's face pass reuses it)."""
        if model not in self._engines:
            self._engines[model] = self._engine_for(model)  # not kept when it raises: asked again next time
        return self._engines[model]

    def _count(self, real: int) -> None:
        with self._wake:
            counts = self._counts
            counts.batches += 1
            counts.images += real
            counts.max_batch_size = max(counts.max_batch_size, real)


def _fail(future: Future, error: BaseException) -> None:
    """Fail a future unless it is already done or was cancelled."""
    try:
        future.set_exception(error)
    except InvalidStateError:  # cancelled by its client meanwhile
        pass
