"""Compare a plan with the output folder's manifest: new / unchanged / changed / removed.

A result is unchanged only when its manifest row is `ok`, has the same content hash and output
path, and the file on disk still has the recorded sha256 — or when its ttl expired (`flowgen gc`
removed the file) and its content hash is the same. Everything else runs again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from flowgen.plan.hashing import BASE_DTYPE, image_params, sha256_file
from flowgen.plan.model import Plan, PlannedResult

# (item_id, result_index) -> (status, content_hash, output_path, output_sha256)
ManifestIndex = dict[tuple[str, int], tuple[str, str, "str | None", "str | None"]]


@dataclass(frozen=True)
class PlanDiff:
    """A plan classified against one manifest state (immutable; see the module doc)."""

    order: tuple[PlannedResult, ...] = field(default=(), repr=False)  # every planned result
    new: tuple[PlannedResult, ...] = ()
    unchanged: tuple[PlannedResult, ...] = ()
    changed: tuple[tuple[PlannedResult, list[str]], ...] = ()  # (result, reasons)
    removed: tuple[tuple[str, int], ...] = ()

    @cached_property
    def to_run(self) -> tuple[PlannedResult, ...]:
        """Results that need rendering, in plan order (computed once)."""
        if self.new is self.order:
            return self.order  # everything is new (no manifest yet): no set of 100k ids
        if not self.changed and len(self.new) == len(self.order) and all(a is b for a, b in zip(self.new, self.order)):
            return self.order  # everything is new (no manifest yet): no set of 100k ids
        pending = {id(r) for r in self.new} | {id(r) for r, _ in self.changed}
        return tuple(r for r in self.order if id(r) in pending)


def relative_output(plan: Plan, result: PlannedResult) -> str:
    """Output path as stored in the manifest: relative to the output folder when inside it."""
    try:
        return result.output_path.relative_to(plan.out_dir).as_posix()
    except ValueError:
        return str(result.output_path)


def diff_plan(
    plan: Plan,
    index: ManifestIndex,
    load_record: Callable[[str, int], dict[str, Any] | None] | None = None,
    verify_files: bool = True,
) -> PlanDiff:
    """Classify every planned result against the manifest index (see module doc).

    load_record, when given, is used to name the fields that changed (plan diff output);
    verify_files re-hashes unchanged outputs (a run must; a quick look may skip it).
    """
    order = tuple(plan.results)
    if not index:  # no manifest yet: everything is new, nothing removed
        return PlanDiff(order=order, new=order)
    new: list[PlannedResult] = []
    unchanged: list[PlannedResult] = []
    changed: list[tuple[PlannedResult, list[str]]] = []
    planned_ids = set()
    for result in order:
        planned_ids.add(result.rid)
        row = index.get(result.rid)
        if row is None:
            new.append(result)
            continue
        reasons = _reasons(plan, result, row, load_record, verify_files)
        if reasons:
            changed.append((result, reasons))
        else:
            unchanged.append(result)
    # results an incremental watermark leaves out are still the recipe's (flowgen.plan.incremental)
    retained = plan.retained_item_ids
    removed = sorted(rid for rid in index if rid not in planned_ids and rid[0] not in retained)
    return PlanDiff(
        order=order, new=tuple(new), unchanged=tuple(unchanged), changed=tuple(changed), removed=tuple(removed)
    )


def _reasons(plan, result, row, load_record, verify_files) -> list[str]:
    status, content_hash, output_path, output_sha = row
    if status == "expired" and content_hash == result.content_hash:
        return []  # its ttl ran out and `flowgen gc` removed it: done, unless the result changes
    reasons: list[str] = []
    if content_hash != result.content_hash:
        old = load_record(*result.rid) if load_record else None
        reasons.extend(changed_fields(old, plan, result) if old else ["parameters"])
    if status != "ok":
        reasons.append(f"last status {status}")
    if output_path != relative_output(plan, result):
        reasons.append("output path")
    elif status == "ok":
        path = result.output_path
        if not path.exists():
            reasons.append("output missing")
        elif verify_files and output_sha and sha256_file(path) != output_sha:
            reasons.append("output modified")
    return reasons


def changed_fields(old: dict[str, Any], plan: Plan, result: PlannedResult) -> list[str]:
    """Names of what differs between a manifest record and a planned result."""
    item = result.item
    fields: list[str] = []
    old_params = image_params(old.get("params") or {})
    new_params = image_params(item.task)
    for name in sorted(set(old_params) | set(new_params)):
        if _norm(old_params.get(name)) != _norm(new_params.get(name)):
            fields.append(name)
    old_refs = [r.get("sha256") for r in old.get("references") or []]
    if old_refs != list(item.reference_hashes):
        fields.append("referenceImages (content)")
    if old.get("seed") != result.seed:
        fields.append("seed")
    if (old.get("model") or {}).get("identity") != plan.model_identity:
        fields.append("model")
    if (old.get("dtype") or BASE_DTYPE) != plan.dtype:
        fields.append("dtype")
    # `model` is both a task parameter and the model identity: name each field once
    return list(dict.fromkeys(fields)) or ["parameters"]


def _norm(value: Any) -> Any:
    return str(value) if isinstance(value, os.PathLike) else value
