"""The planner: recipe items -> Plan (ids, seeds, reference and content hashes, output paths),
batches grouped by shape signature, and the diff against an output folder's manifest.

Pure Python + Pillow (header reads only): `flowgen plan` never imports JAX or loads weights.
"""

from flowgen.plan.batching import chunk_sizes, make_batches
from flowgen.plan.compile import compile_plan
from flowgen.plan.diff import PlanDiff, diff_plan
from flowgen.plan.model import Batch, Plan, PlannedItem, PlannedResult
from flowgen.plan.seeds import derive_seed, item_id_for, result_seed

__all__ = [
    "Batch", "Plan", "PlanDiff", "PlannedItem", "PlannedResult", "chunk_sizes", "compile_plan",
    "derive_seed", "diff_plan", "item_id_for", "make_batches", "result_seed",
]
