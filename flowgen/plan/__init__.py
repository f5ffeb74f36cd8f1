"""The planner: recipe items -> Plan (ids, seeds, reference and content hashes, output paths, one
engine Job per item), and the plan against an output folder's manifest as one immutable RunPlan
(the diff, what runs, its batches grouped by shape signature).

Pure Python + Pillow (header reads only): `flowgen plan` never imports JAX or loads weights.
"""

from flowgen.plan.batching import chunk_sizes, make_batches
from flowgen.plan.compile import compile_plan
from flowgen.plan.diff import PlanDiff, diff_plan
from flowgen.plan.job import Job
from flowgen.plan.model import Batch, Plan, PlannedItem, PlannedResult
from flowgen.plan.run_plan import RunPlan
from flowgen.plan.seeds import derive_seed, item_id_for, result_seed

__all__ = [
    "Batch", "Job", "Plan", "PlanDiff", "PlannedItem", "PlannedResult", "RunPlan", "chunk_sizes", "compile_plan",
    "derive_seed", "diff_plan", "item_id_for", "make_batches", "result_seed",
]
