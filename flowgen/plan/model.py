"""The compiled plan as data: items, their results, and the batches that will render them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowgen.plan.hashing import BASE_DTYPE

# (width, height, steps, guidance or None, scheduler name): what one sampling loop must share.
# Reference sets are not part of it: the engine stacks each row's references (padded to a length
# bucket and masked), so items with any references, or none, may share a batch.
Signature = tuple[int, int, int, "float | None", str]


@dataclass(slots=True)
class PlannedItem:
    """One recipe item after planning: identity, resolved task, reference contents, item hash."""

    item_id: str
    key: str
    values: dict[str, Any]
    task: dict[str, Any]
    references: tuple[str, ...]
    reference_hashes: tuple[str, ...]
    reference_sizes: tuple[tuple[int, int], ...]
    item_hash: str
    guidance: float | None
    error: str | None = None  # set when the item cannot run (e.g. an unreadable reference)

    @property
    def signature(self) -> Signature:
        t = self.task
        return (int(t["width"]), int(t["height"]), int(t["steps"]), self.guidance, str(t.get("scheduler") or "Default"))

    @property
    def reference_set(self) -> str:
        """Identity of the reference set by content: results sharing it share a pre-pass."""
        return "|".join(self.reference_hashes)


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


@dataclass(slots=True)
class Batch:
    """Results rendered together in one engine call; `size` is a power of two ≥ len(results)."""

    signature: Signature
    results: list[PlannedResult]
    size: int

    @property
    def padding(self) -> int:
        return self.size - len(self.results)


@dataclass
class Plan:
    """A recipe compiled against one model and one output folder."""

    recipe_name: str
    model: str
    model_identity: dict[str, Any]
    out_dir: Path
    items: list[PlannedItem]
    results: list[PlannedResult]
    recipe_hash: str
    max_batch: int
    plan_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: str = BASE_DTYPE  # the resolved compute dtype every result is rendered (and hashed) in
