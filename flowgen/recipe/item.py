"""The contract between the recipe layer and the planner.

The recipe layer (flowgen/recipe) loads and validates a recipe and expands it into Items; the planner
(flowgen/plan) turns Items into Results (one per numberResults index) with seeds, content hashes,
output paths and batches. Keep this file small: it is the only thing both sides import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Item:
    """One cell of the recipe's matrix, fully resolved.

    key:        stable identity built from dataset keys and matrix values only (never a row
                position), e.g. "product=A-100|surface=marble". Seeds and ids derive from it.
    values:     matrix variable -> its value (a dataset row as a dict, or a scalar), for templating
                the output filename.
    task:       every imageInference field after defaults, templating and --set overrides, spelled
                as in the Runware spec (positivePrompt, width, height, steps, seed, numberResults,
                CFGScale, outputFormat, outputQuality, ...). referenceImages are absolute paths.
    references: the reference image paths (absolute), in order; also in task["referenceImages"].
    """

    key: str
    values: dict[str, Any]
    task: dict[str, Any]
    references: tuple[Path, ...] = field(default_factory=tuple)
