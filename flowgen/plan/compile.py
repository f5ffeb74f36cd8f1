"""Compile recipe items into a Plan: ids, seeds, reference and LoRA file hashes, content hashes, output paths."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flowgen.engine import resolve_step_cache
from flowgen.errors import RecipeError
from flowgen.gc_pause import paused_gc
from flowgen.plan.hashing import BASE_DTYPE, ItemHasher, model_key, result_hash
from flowgen.plan.job import Job
from flowgen.plan.loras import LoraResolver
from flowgen.plan.model import Plan, PlannedItem, PlannedResult
from flowgen.plan.references import ReferenceInspector
from flowgen.plan.seeds import item_id_for, result_seed
from flowgen.plan.task import ResolvedTask
from flowgen.recipe.api import Item
from flowgen.recipe.spec import OUTPUT_EXTENSIONS

EXTENSIONS = OUTPUT_EXTENSIONS  # outputFormat -> file extension, the spec's three formats
# Relative names that os.path.normpath leaves as they are ('/'-separated, no '.', '..' or empty
# segments): joined to the (normalised) output folder with a plain '/'.
_PLAIN_RELATIVE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")

# (item, result_index, ext) -> output path, relative to the output folder (or absolute)
FilenameFn = Callable[[Item, int, str], "str | Path"]


def output_ext(task: dict[str, Any]) -> str:
    """File extension for a raw task's outputFormat (spec default JPG); planned items have it in
    their job (extension_for(job.output_format))."""
    return extension_for(str(task.get("outputFormat") or "JPG").upper())


def extension_for(output_format: str) -> str:
    """File extension for an outputFormat as a Job holds it (upper case)."""
    if output_format not in EXTENSIONS:
        raise RecipeError(f"outputFormat: {output_format!r} is not one of JPG, PNG, WEBP")
    return EXTENSIONS[output_format]


def guidance_for(task: dict[str, Any], distilled: bool) -> float | None:
    """CFG scale when guidance is on, else None: off for CFGScale ≤ 1 and for distilled models
    (step-distilled Klein ignores guidance, as diffusers does)."""
    scale = task.get("CFGScale")
    if distilled or scale is None or float(scale) <= 1.0:
        return None
    return float(scale)


def compile_plan(
    *,
    recipe_name: str,
    recipe_seed: int | None,
    items: Iterable[Item],
    out_dir: str | Path,
    filename: FilenameFn,
    model: str,
    model_identity: dict[str, Any],
    distilled: bool,
    recipe_hash: str,
    max_batch: int = 8,
    dtype: str = BASE_DTYPE,
    inspector: ReferenceInspector | None = None,
    reference_check: Callable[[Item], list[str]] | None = None,
) -> Plan:
    """Plan every result of every item. Per-item problems (unreadable references) are recorded on
    the item, not raised; plan-wide problems (two results writing one file) raise RecipeError.
    reference_check(item) -> problems runs once per distinct reference set (sizes, count rules).
    dtype: the resolved compute dtype ('float32' or 'bfloat16'), part of every content hash."""
    with paused_gc():
        out = Path(out_dir).resolve()
        out_text = str(out)
        out_prefix = out_text + "/" if os.sep == "/" and out_text != "/" else None
        hash_item = ItemHasher(model_key(model_identity, dtype))  # the model identity is serialised and hashed once
        inspector = inspector or ReferenceInspector()
        loras_of = LoraResolver()  # task.lora -> files and content hashes, once per distinct list
        planned_items: list[PlannedItem] = []
        results: list[PlannedResult] = []
        seen_ids: dict[str, str] = {}
        checked: dict[tuple, str | None] = {}
        ext_of: dict[str, str] = {}  # outputFormat -> extension
        for item in items:
            planned, task_seed = _plan_item(item, recipe_name, hash_item, distilled, inspector, loras_of)
            if planned.error is None and item.references and reference_check is not None:
                if item.references not in checked:
                    problems = reference_check(item)
                    checked[item.references] = problems[0] if problems else None
                planned.error = checked[item.references]
            if planned.item_id in seen_ids:
                raise RecipeError(f"items {seen_ids[planned.item_id]!r} and {item.key!r}: duplicate item key")
            seen_ids[planned.item_id] = item.key
            planned_items.append(planned)
            output_format = planned.job.output_format
            ext = ext_of.get(output_format)
            if ext is None:
                ext = ext_of[output_format] = extension_for(output_format)
            for index in range(planned.number_results):
                seed = result_seed(task_seed, recipe_seed, item.key, index)
                name = filename(item, index, ext)
                if name.__class__ is not str:
                    name = str(name)
                if out_prefix is not None and _PLAIN_RELATIVE.fullmatch(name):
                    path = out_prefix + name
                else:
                    path = os.path.normpath(os.path.join(out_text, name))
                results.append(PlannedResult(planned, index, seed, result_hash(planned.item_hash, seed, index), path))
        _check_unique_paths(results)
        return Plan(
            recipe_name,
            model,
            model_identity,
            out,
            planned_items,
            results,
            recipe_hash,
            max_batch,
            plan_hash=_plan_hash(recipe_hash, results),
            dtype=dtype,
        )


def _plan_item(
    item: Item,
    recipe_name: str,
    hash_item: ItemHasher,
    distilled: bool,
    inspector: ReferenceInspector,
    loras_of: LoraResolver,
) -> tuple[PlannedItem, int | None]:
    """The planned item, and the task's fixed seed (None: each result's is derived)."""
    hashes: list[str] = []
    sizes: list[tuple[int, int]] = []
    error = None
    for ref in item.references:
        try:
            digest, size = inspector.inspect(ref)
        except ValueError as err:
            error = error or str(err)
            digest, size = "unreadable", (0, 0)
        hashes.append(digest)
        sizes.append(size)
    task = item.task
    loras = loras_of(task, item.key)
    resolved = ResolvedTask.from_task(
        task, guidance=guidance_for(task, distilled), references=item.references, reference_hashes=hashes, loras=loras
    )
    planned = PlannedItem(
        item_id=item_id_for(recipe_name, item.key),
        key=item.key,
        values=item.values,
        task=task,
        job=resolved.job,
        reference_sizes=tuple(sizes),
        item_hash=hash_item(
            _hashed_task(task, resolved.job, distilled), hashes, tuple((digest, weight) for _, digest, weight in loras)
        ),
        error=error,
        delivery=resolved.delivery,
        number_results=resolved.number_results,
    )
    return planned, resolved.seed


def _hashed_task(task: dict, job: Job, distilled: bool) -> dict:
    """The task as its item hash sees it: with the step cache it resolves to, when one may skip steps.

    The `acceleration` default (`high`) caches base-model loops of more than a few steps, so a task
    that never names it renders differently from before step caches existed; hashing the resolved
    cache keeps such results from reading as up to date. Uncached tasks hash as they always have."""
    cache = resolve_step_cache(job.acceleration, job.accelerator_dict, steps=job.steps, distilled=distilled)
    return task if cache is None else {**task, "_stepCache": cache.as_dict()}


def _check_unique_paths(results: list[PlannedResult]) -> None:
    owners: dict[str, PlannedResult] = {}
    problems = []
    for result in results:
        other = owners.setdefault(result.output_file, result)
        if other is not result:
            problems.append(
                f"output.filename: items {other.item.key!r}#{other.result_index} and "
                f"{result.item.key!r}#{result.result_index} both write {result.output_file}; "
                "add {result_index} or an item field to the filename template"
            )
            if len(problems) >= 5:
                break
    if problems:
        raise RecipeError(problems)


def _plan_hash(recipe_hash: str, results: list[PlannedResult]) -> str:
    digest = hashlib.sha256(recipe_hash.encode())
    lines = sorted(f"{r.item.item_id}:{r.result_index}:{r.content_hash}\n" for r in results)
    digest.update("".join(lines).encode())
    return digest.hexdigest()
