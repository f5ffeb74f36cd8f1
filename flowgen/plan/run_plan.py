"""A plan against one manifest state, as an immutable value: the diff, what runs, and its batches.

    run_plan = plan.against(manifest.index(), manifest.get)
    run_plan.diff        # new / unchanged / changed / removed (flowgen.plan.diff)
    run_plan.to_run      # results that need rendering, in plan order
    run_plan.runnable    # ... of them, those that can run (no item error), at most `limit`
    run_plan.blocked     # ... of them, those that cannot (e.g. an unreadable reference)
    run_plan.batches()   # the runnable results grouped into engine calls (computed once)

`flowgen plan` reports one, `execute()` runs one (flowgen.run.executor.against_folder builds it;
the run reuses it when it was built against the manifest state it finds under the output folder's
lock, else builds it again there), and a server can hold one between planning and running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from flowgen.plan.batching import make_batches
from flowgen.plan.diff import ManifestIndex, PlanDiff, diff_plan
from flowgen.plan.model import Batch, Plan, PlannedResult

__all__ = ["ManifestIndex", "RunPlan"]


@dataclass(frozen=True)
class RunPlan:
    """`plan` classified against one manifest index; build it with `Plan.against` (or RunPlan.build)."""

    plan: Plan
    diff: PlanDiff
    runnable: tuple[PlannedResult, ...]  # to run and able to, in plan order, cut to `limit`
    blocked: tuple[PlannedResult, ...]  # to run but unable to (item error): recorded as failed, never rendered
    held_back: int = 0  # runnable results beyond `limit`
    limit: int | None = None
    verified: bool = True  # unchanged outputs were re-hashed (what a run requires)
    index: ManifestIndex = field(default_factory=dict, repr=False, compare=False)  # the state it was built against

    @classmethod
    def build(
        cls,
        plan: Plan,
        index: ManifestIndex,
        load_record: Callable[[str, int], dict[str, Any] | None] | None = None,
        verify_files: bool = True,
    ) -> RunPlan:
        diff = diff_plan(plan, index, load_record, verify_files)
        todo = diff.to_run
        blocked = tuple(r for r in todo if r.item.error)
        runnable = todo if not blocked else tuple(r for r in todo if not r.item.error)
        return cls(plan, diff, runnable, blocked, verified=verify_files, index=index)

    @property
    def to_run(self) -> tuple[PlannedResult, ...]:
        """Every result that needs rendering (runnable or blocked), in plan order."""
        return self.diff.to_run

    def batches(self) -> tuple[Batch, ...]:
        """The runnable results as engine calls (flowgen.plan.batching), computed on first use only."""
        return self._batches

    @cached_property
    def _batches(self) -> tuple[Batch, ...]:
        return tuple(make_batches(self.runnable, self.plan.max_batch, self.plan.batch_multiple))

    def limited(self, limit: int | None) -> RunPlan:
        """The same value with at most `limit` runnable results (the first in plan order); None: all."""
        if limit == self.limit:
            return self
        every = self.runnable if self.limit is None else _runnable(self.diff)
        if limit is None:
            return replace(self, runnable=every, held_back=0, limit=None)
        return replace(self, runnable=every[:limit], held_back=max(0, len(every) - limit), limit=limit)

    def is_current(self, index: ManifestIndex) -> bool:
        """Whether it was built, with outputs verified, against this manifest state (a run may reuse it)."""
        return self.verified and self.index == index


def _runnable(diff: PlanDiff) -> tuple[PlannedResult, ...]:
    return tuple(r for r in diff.to_run if not r.item.error)
