"""Group results into batches that bound the number of compiled programs.

Results with the same signature (output size, steps, guidance, scheduler) may share an engine call,
whatever their references. Batch sizes are powers of two up to `max_batch`, so a whole run compiles at most
log2(max_batch)+1 batch sizes per signature. Inside a signature, results are ordered by reference
set (largest groups first) and prompt so that a reference set and a prompt (encoded once) are shared
by as many neighbours as possible.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flowgen.gc_pause import paused_gc
from flowgen.plan.job import Job
from flowgen.plan.model import Batch, PlannedResult, Signature

T = TypeVar("T")

# A remainder is padded up to the next power of two when at most this share of it is padding
# (7 -> 8, 3 -> 4); otherwise it is split into smaller powers of two (5 -> 4 + 1).
MAX_PADDING_SHARE = 0.25


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def chunk_sizes(n: int, max_batch: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Split n results into (real count, padded size) chunks with power-of-two sizes ≤ max_batch.

    multiple: every padded size is a multiple of it (a device mesh's "data" size: each device gets
    whole rows); the largest chunk is then at least `multiple`, and a remainder is padded up to a
    multiple rather than split below it."""
    cap = round_up(1 << (max(1, max_batch).bit_length() - 1), multiple)  # largest power of two ≤ max_batch
    chunks: list[tuple[int, int]] = []
    while n > 0:
        if n >= cap:
            chunks.append((cap, cap))
            n -= cap
            continue
        padded = min(round_up(next_pow2(n), multiple), cap)
        low = round_up(next_pow2(n) // 2, multiple)  # the smaller whole chunk a split would cut
        if (padded - n) / padded <= MAX_PADDING_SHARE or low >= n or low < multiple:
            chunks.append((n, padded))
            n = 0
        else:
            chunks.append((low, low))
            n -= low
    return chunks


def batch_order(rows: Sequence[T], job_of: Callable[[T], Job], then: Callable[[T], Any]) -> list[T]:
    """The row order of a batch, for the planner's results and the server's requests alike: largest
    reference-set groups first, each contiguous, then by prompt, then by `then` (a stable tie-break).
    A set that fills a whole batch runs with one shared (copy-free) K/V, and neighbours share prompts."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[job_of(row).reference_set] += 1

    def key(row: T) -> tuple:
        job = job_of(row)
        return (-counts[job.reference_set], job.reference_set, job.prompt, then(row))

    return sorted(rows, key=key)


def _job(result: PlannedResult) -> Job:
    return result.item.job


def _rid(result: PlannedResult) -> tuple[str, int]:
    return result.item.item_id, result.result_index


def make_batches(results: Sequence[PlannedResult], max_batch: int, multiple: int = 1) -> list[Batch]:
    """Batches for `results` (only runnable ones should be passed), in a deterministic order; sizes
    are multiples of `multiple` (the engine's device mesh, `Plan.batch_multiple`).
    (A run gets them from its RunPlan, flowgen.plan.run_plan, which calls this once.)"""
    with paused_gc():
        return _batches(results, max_batch, multiple)


def _batches(results: Sequence[PlannedResult], max_batch: int, multiple: int = 1) -> list[Batch]:
    groups: dict[Signature, list[PlannedResult]] = defaultdict(list)
    for result in results:
        groups[result.item.job.signature].append(result)  # dict keeps first-appearance order
    batches: list[Batch] = []
    for signature, members in groups.items():
        members = batch_order(members, _job, _rid)
        start = 0
        for count, size in chunk_sizes(len(members), max_batch, multiple):
            batches.append(Batch(signature, tuple(members[start : start + count]), size))
            start += count
    return batches
