"""The planner: recipe items -> Plan (ids, seeds, reference and content hashes, output paths; each
item's task read once into typed values: its engine Job and its Delivery, flowgen.plan.task), and
the plan against an output folder's manifest as one immutable RunPlan (the diff, what runs, its
batches grouped by Signature).

Pure Python + Pillow (header reads only): `flowgen plan` never imports JAX or loads weights.
"""

from flowgen.plan.batching import chunk_sizes, make_batches
from flowgen.plan.compile import compile_plan
from flowgen.plan.diff import PlanDiff, diff_plan
from flowgen.plan.job import FacePass, Job, Signature
from flowgen.plan.model import Batch, Canary, Plan, PlannedItem, PlannedResult, RecipeSource
from flowgen.plan.run_plan import RunPlan
from flowgen.plan.seeds import derive_seed, item_id_for, result_seed
from flowgen.plan.task import Delivery, ResolvedTask

__all__ = [
    "Batch",
    "Canary",
    "Delivery",
    "FacePass",
    "Job",
    "Plan",
    "PlanDiff",
    "PlannedItem",
    "PlannedResult",
    "RecipeSource",
    "ResolvedTask",
    "RunPlan",
    "Signature",
    "chunk_sizes",
    "compile_plan",
    "derive_seed",
    "diff_plan",
    "item_id_for",
    "make_batches",
    "result_seed",
]
