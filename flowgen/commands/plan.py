"""`flowgen plan RECIPE`: the dry run — items, results, batches and the diff against the output folder."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Sequence

import click

from flowgen.plan.batching import make_batches, signature_label
from flowgen.plan.diff import PlanDiff, diff_plan
from flowgen.plan.from_recipe import plan_recipe
from flowgen.plan.model import Plan
from flowgen.run.dtype import dtype_setting, guess_backend, resolve_dtype
from flowgen.run.manifest import Manifest, manifest_path

SHOW_ITEMS = 20


def plan_command(recipe: str, out_dir: str | None, overrides: Sequence[str], as_json: bool,
                 max_batch: int | None = None, dtype: str | None = None) -> None:
    """Compile RECIPE and print what a run would do; loads no model (nor JAX), writes nothing.

    dtype: --dtype (None: $FLOWGEN_DTYPE, else auto, for the backend JAX would pick).
    """
    plan = plan_recipe(recipe, out_dir, overrides, max_batch, resolve_dtype(dtype_setting(dtype), guess_backend()))
    diff = load_diff(plan)
    report = plan_report(plan, diff)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        print_plan(report)


def load_diff(plan: Plan) -> PlanDiff:
    """Diff against the output folder's manifest (everything is new when there is none)."""
    if not manifest_path(plan.out_dir).exists():
        return diff_plan(plan, {})
    with Manifest(plan.out_dir, create=False) as manifest:
        return diff_plan(plan, manifest.index(), manifest.get)


def plan_report(plan: Plan, diff: PlanDiff) -> dict[str, Any]:
    """The plan as JSON-able data (what `plan --json` prints)."""
    runnable = [r for r in diff.to_run if not r.item.error]
    batches = make_batches(runnable, plan.max_batch)
    rid = lambda r: f"{r.item.item_id}#{r.result_index}"  # noqa: E731
    return {
        "recipe": plan.recipe_name,
        "model": plan.model,
        "dtype": plan.dtype,
        "out_dir": str(plan.out_dir),
        "plan_hash": plan.plan_hash,
        "counts": {
            "items": len(plan.items),
            "results": len(plan.results),
            "new": len(diff.new),
            "unchanged": len(diff.unchanged),
            "changed": len(diff.changed),
            "removed": len(diff.removed),
            "to_run": len(runnable),
            "errors": sum(1 for item in plan.items if item.error),
            "batches": len(batches),
        },
        "items": [
            {"item_id": i.item_id, "key": i.key, "results": int(i.task.get("numberResults") or 1),
             "references": len(i.references), "error": i.error}
            for i in plan.items
        ],
        "diff": {
            "new": [rid(r) for r in diff.new],
            "changed": [{"result": rid(r), "key": r.item.key, "fields": reasons} for r, reasons in diff.changed],
            "removed": [f"{item_id}#{index}" for item_id, index in diff.removed],
        },
        "batches": [
            {"signature": signature_label(b.signature), "size": b.size, "padding": b.padding,
             "reference_sets": len({r.item.reference_set for r in b.results}),
             "prompts": len({r.item.task.get("positivePrompt") for r in b.results}),
             "results": [rid(r) for r in b.results]}
            for b in batches
        ],
    }


def print_plan(report: dict[str, Any]) -> None:
    counts = report["counts"]
    click.echo(f"recipe {report['recipe']} -> {report['out_dir']}  (model {report['model']}, {report['dtype']})")
    click.echo(f"{counts['items']} item(s), {counts['results']} result(s): {counts['new']} new, "
               f"{counts['unchanged']} unchanged, {counts['changed']} changed, {counts['removed']} removed in the manifest")
    for item in report["items"][:SHOW_ITEMS]:
        refs = f", {item['references']} ref(s)" if item["references"] else ""
        click.echo(f"  {item['item_id']}  {item['key']}  ({item['results']} result(s){refs})")
    if len(report["items"]) > SHOW_ITEMS:
        click.echo(f"  ... {len(report['items']) - SHOW_ITEMS} more")
    for change in report["diff"]["changed"][:SHOW_ITEMS]:
        click.echo(f"  changed {change['result']} {change['key']}: {', '.join(change['fields'])}")
    for item in report["items"]:
        if item["error"]:
            click.echo(f"  error   {item['item_id']} {item['key']}: {item['error']}")
    groups: Counter = Counter()
    sizes: dict[str, list[int]] = {}
    for batch in report["batches"]:
        groups[batch["signature"]] += len(batch["results"])
        sizes.setdefault(batch["signature"], []).append(batch["size"])
    click.echo(f"to run: {counts['to_run']} result(s) in {counts['batches']} batch(es)")
    for signature, count in groups.items():
        click.echo(f"  {signature}: {count} result(s), batch sizes {' '.join(map(str, sizes[signature]))}")
