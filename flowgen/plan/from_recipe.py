"""Recipe file -> Plan: the one place that joins the recipe layer and the planner."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from flowgen.plan.compile import compile_plan
from flowgen.plan.hashing import BASE_DTYPE, canonical_json
from flowgen.plan.incremental import WatermarkReader, incremental_datasets, select_new
from flowgen.plan.model import Canary, Plan, RecipeSource

DEFAULT_MAX_BATCH = 8  # `--max-batch` or FLOWGEN_MAX_BATCH override it (bigger on large accelerators)


def model_facts(recipe: Any) -> tuple[str, dict[str, Any], bool]:
    """(model name as written, identity for hashing, distilled?) without loading any weights."""
    card = recipe.card
    name = recipe.model or (getattr(card, "name", None) if card is not None else None) or "default"
    identity = card.identity() if card is not None and hasattr(card, "identity") else {"model": name}
    return name, identity, bool(recipe.distilled)


def plan_recipe(
    path: str | Path,
    out_dir: str | Path | None,
    overrides: Sequence[str] = (),
    max_batch: int | None = DEFAULT_MAX_BATCH,
    dtype: str = BASE_DTYPE,
    watermarks: WatermarkReader | None = None,
) -> Plan:
    """Load, expand and compile a recipe against an output folder (RecipeError on user errors).

    max_batch: largest batch per engine call (rounded down to a power of two; None: DEFAULT_MAX_BATCH).
    The environment is not read here: the commands resolve --max-batch / FLOWGEN_MAX_BATCH with
    flowgen.run.settings.max_batch_setting. It only groups work: seeds and hashes do not depend on
    it (and regen replays an image at its recorded batch size).
    dtype: the resolved compute dtype (see flowgen.run.dtype); it is part of every content hash.
    watermarks(out_dir) -> the incremental datasets' watermarks of that folder (the commands pass
    flowgen.run.manifest.load_watermarks); None plans every row, as if none were recorded. With
    `incremental: true` datasets, plan.incremental holds what each watermark selects, the items it
    leaves out (still the recipe's, not removed) and the watermarks a successful run records.
    """
    from flowgen.recipe.api import expand_items, load_recipe

    recipe = load_recipe(path, list(overrides))
    items = expand_items(recipe)
    selection = None
    if incremental_datasets(recipe):
        recorded = watermarks(recipe.output_dir(out_dir)) if watermarks is not None else {}
        selection = select_new(recipe, items, recorded)
        items = selection.items
    model, identity, distilled = model_facts(recipe)
    plan = compile_plan(
        recipe_name=recipe.name,
        recipe_seed=recipe.seed,
        items=items,
        out_dir=recipe.output_dir(out_dir),
        filename=recipe.filename_renderer(),  # the names expand_items rendered, remembered
        model=model,
        model_identity=identity,
        distilled=distilled,
        recipe_hash=hashlib.sha256(canonical_json(recipe.raw).encode()).hexdigest(),
        max_batch=max_batch or DEFAULT_MAX_BATCH,
        dtype=dtype,
        reference_check=_reference_check(),
    )
    canary = recipe.canary
    return replace(
        plan,
        card=recipe.card,
        source=recipe_source(path),
        incremental=selection.increment() if selection is not None else None,
        canary=Canary(int(canary.items), float(canary.threshold_db)) if canary is not None else None,
    )


def recipe_source(path: str | Path, overrides: Sequence[str] = (), out_option: bool = False) -> RecipeSource:
    """The recipe file (resolved) and the run's options, as a run records them (Plan.source)."""
    return RecipeSource(str(Path(path).resolve()), tuple(overrides), out_option)


def _reference_check():
    """The recipe layer's per-item reference check (sizes, count), when it exists."""
    try:
        from flowgen.recipe.api import check_references
    except ImportError:  # pragma: no cover - older recipe layer
        return None
    return lambda item: check_references([item])
