"""The compiled plan as data: items (each with its job), their results, and the batches that render them.

`Plan.against(manifest_index)` gives the plan's immutable run value (flowgen.plan.run_plan.RunPlan):
the diff against an output folder's manifest, what runs, and its batches, computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowgen.plan.hashing import BASE_DTYPE
from flowgen.plan.incremental import Increment
from flowgen.plan.job import Job, Signature
from flowgen.plan.task import NO_DELIVERY, Delivery

if TYPE_CHECKING:  # pragma: no cover
    from flowgen.plan.run_plan import ManifestIndex, RunPlan

__all__ = [
    "Batch",
    "Canary",
    "Delivery",
    "Increment",
    "Job",
    "Plan",
    "PlannedItem",
    "PlannedResult",
    "RecipeSource",
    "Signature",
]


@dataclass(slots=True)
class PlannedItem:
    """One recipe item after planning: identity, resolved task, its job, reference sizes, item hash.

    `task` is the resolved task as the recipe gave it (its hash, the record's params, metadata);
    `job` is what the engine needs from it (prompt, size, steps, guidance, scheduler, references +
    content hashes, output format and quality, LoRAs, face pass) and `delivery` what happens to its
    images after (content check, cost, upload, webhook): both read once at plan time
    (flowgen.plan.task.ResolvedTask)."""

    item_id: str
    key: str
    values: dict[str, Any]
    task: dict[str, Any]
    job: Job
    reference_sizes: tuple[tuple[int, int], ...]
    item_hash: str
    error: str | None = None  # set when the item cannot run (e.g. an unreadable reference)
    delivery: Delivery = NO_DELIVERY
    number_results: int = 1

    @property
    def references(self) -> tuple[str, ...]:
        return self.job.references

    @property
    def reference_hashes(self) -> tuple[str, ...]:
        return self.job.reference_hashes

    @property
    def guidance(self) -> float | None:
        return self.job.guidance

    @property
    def signature(self) -> Signature:
        return self.job.signature

    @property
    def reference_set(self) -> str:
        """Identity of the reference set by content: results sharing it share a pre-pass."""
        return self.job.reference_set


@dataclass(slots=True)
class PlannedResult:
    """One image to produce: result `result_index` of `item`."""

    item: PlannedItem
    result_index: int
    seed: int
    content_hash: str
    output_file: str  # absolute path, kept as a string: plans may hold 100k+ results

    @property
    def output_path(self) -> Path:
        return Path(self.output_file)

    @property
    def rid(self) -> tuple[str, int]:
        return (self.item.item_id, self.result_index)

    @property
    def job(self) -> Job:
        """The item's job (the engine renders it with this result's seed)."""
        return self.item.job


@dataclass(frozen=True, slots=True)
class Batch:
    """Results rendered together in one engine call; `size` is a power of two ≥ len(results)."""

    signature: Signature
    results: tuple[PlannedResult, ...]
    size: int

    @property
    def padding(self) -> int:
        return self.size - len(self.results)


@dataclass(frozen=True)
class RecipeSource:
    """The recipe file a plan was compiled from, and the options its run was given: recorded with
    the run (flowgen.run.manifest.Manifest.record_plan), so `prune` and `status` plan the same way."""

    path: str  # the recipe file, resolved
    overrides: tuple[str, ...] = ()  # the run's --set options
    out_option: bool = False  # the output folder came from --out, not the recipe (`status` hints say --out)

    def as_record(self) -> dict[str, Any]:
        """As the manifest keeps it ({"path", "overrides", "out_option"})."""
        return {"path": self.path, "overrides": list(self.overrides), "out_option": self.out_option}


@dataclass(frozen=True)
class Canary:
    """The recipe's golden-seed canary (flowgen.run.canary): how many fixed items are re-rendered
    before a run, and the PSNR each must keep against its first render."""

    items: int
    threshold_db: float


@dataclass(frozen=True)
class Plan:
    """A recipe compiled against one model and one output folder (immutable: what a run adds, e.g.
    its --set options, makes a new Plan with dataclasses.replace)."""

    recipe_name: str
    model: str
    model_identity: dict[str, Any]
    out_dir: Path
    items: list[PlannedItem]
    results: list[PlannedResult]
    recipe_hash: str
    max_batch: int
    plan_hash: str = ""
    dtype: str = BASE_DTYPE  # the resolved compute dtype every result is rendered (and hashed) in
    card: Any = None  # the recipe's model card (flowgen.engine), None without one: what a run loads
    source: RecipeSource | None = None  # the recipe file it came from; None for a plan compiled in code
    incremental: Increment | None = None  # what its incremental datasets' watermarks select; None without any
    canary: Canary | None = None  # the recipe's golden-seed canary, if it has one
    batch_multiple: int = 1  # batch sizes are multiples of it: the engine's device mesh "data" size (not hashed)

    @property
    def engine_model(self) -> Any:
        """What the engine loads: the model card, else the model as the recipe names it."""
        return self.card or self.model

    @property
    def retained_item_ids(self) -> frozenset[str]:
        """Items an incremental watermark leaves out: still the recipe's, so their results are not removed."""
        return self.incremental.retained_item_ids if self.incremental is not None else frozenset()

    def against(
        self,
        index: ManifestIndex,
        load_record: Callable[[str, int], dict | None] | None = None,
        verify_files: bool = True,
    ) -> RunPlan:
        """This plan against a manifest index ({} for a folder without one): the immutable run value
        with the diff, the results to run and their batches (see flowgen.plan.run_plan)."""
        from flowgen.plan.run_plan import RunPlan

        return RunPlan.build(self, index, load_record, verify_files)
