"""`flowgen plan RECIPE`: the dry run — items, results, batches and the diff against the output folder."""

from __future__ import annotations

import json
import shlex
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import click

from flowgen.commands.models import weights_note
from flowgen.engine import guess_backend
from flowgen.plan.from_recipe import plan_recipe
from flowgen.plan.model import Plan
from flowgen.plan.run_plan import RunPlan
from flowgen.run import cost
from flowgen.run.dtype import dtype_setting, resolve_dtype
from flowgen.run.manifest import Manifest, load_watermarks, manifest_path
from flowgen.run.merge import fold_shards
from flowgen.run.settings import max_batch_setting

SHOW_ITEMS = 20


def plan_command(
    recipe: str,
    out_dir: str | None,
    overrides: Sequence[str],
    as_json: bool,
    max_batch: int | None = None,
    dtype: str | None = None,
) -> None:
    """Compile RECIPE and print what a run would do; loads no model (nor JAX), writes nothing.

    max_batch: --max-batch (None: $FLOWGEN_MAX_BATCH, else 8).
    dtype: --dtype (None: $FLOWGEN_DTYPE, else auto, for the backend JAX would pick).
    """
    compute_dtype = resolve_dtype(dtype_setting(dtype), guess_backend())
    plan = plan_recipe(
        recipe, out_dir, overrides, max_batch_setting(max_batch), compute_dtype, watermarks=load_watermarks
    )
    run_plan, history, last_recipe = load_run_plan(plan)
    report = plan_report(run_plan, history)
    report["prune_command"] = prune_hint(plan, recipe, overrides, last_recipe)
    # a note, not an error: the plan is sound, but `run` stops until this machine has the weights
    report["weights_note"] = weights_note(plan.card)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        print_plan(report)
        if report["weights_note"]:
            click.echo(f"note: {report['weights_note']}")


def load_run_plan(plan: Plan) -> tuple[RunPlan, list[dict], dict[str, Any] | None]:
    """The plan against the output folder's manifest (everything is new when there is none), the
    manifest's records (what earlier runs measured, for the cost estimate), and the recipe the last
    run used ({"path", "overrides"}, or None). What shard runs recorded is folded in first."""
    fold_shards(plan.out_dir)  # (flowgen.run.merge)
    if not manifest_path(plan.out_dir).exists():
        return plan.against({}), [], None
    with Manifest(plan.out_dir, create=False) as manifest:
        return plan.against(manifest.index(), manifest.get), list(manifest.records()), manifest.last_recipe()


def prune_hint(plan: Plan, recipe: str, overrides: Sequence[str], last_recipe: dict[str, Any] | None) -> str:
    """The `flowgen prune` command that removes what this plan lists as removed: plain when this is the
    recipe (and --set options) the last run used, which prune compares with by default; else with
    --recipe (prune takes no --set: with other options, it compares with the recipe file as it is)."""
    command = ["flowgen", "prune", str(plan.out_dir)]
    last = last_recipe or {}
    recipe_path = plan.source.path if plan.source is not None else None
    if last.get("path") != recipe_path or list(last.get("overrides") or ()) != list(overrides):
        command += ["--recipe", recipe]
    return shlex.join(command)


def cost_estimate(batches, history: list[dict]) -> dict[str, Any]:
    """Engine seconds and USD for `batches`, from the median seconds per image that earlier results
    of the same signature took (flowgen.run.cost); signatures never run here have no estimate."""
    per_second = cost.rate()
    seconds, unknown = 0.0, 0
    for batch in batches:
        per_image = cost.seconds_per_image(history, batch.signature.label)
        if per_image is None:
            unknown += len(batch.results)
        else:
            seconds += per_image * batch.size
    return {
        "rate_per_second": per_second,
        "engine_seconds": round(seconds, 3),
        "usd": cost.cost_of(seconds, per_second),
        "results_without_estimate": unknown,
    }


def plan_report(run_plan: RunPlan, history: Sequence[dict] = ()) -> dict[str, Any]:
    """The plan against its output folder as JSON-able data (what `plan --json` prints)."""
    plan, diff = run_plan.plan, run_plan.diff
    runnable, batches = run_plan.runnable, run_plan.batches()
    rid = lambda r: f"{r.item.item_id}#{r.result_index}"  # noqa: E731
    shown_removed = set(diff.removed[:SHOW_ITEMS])
    recorded = {
        (r["item_id"], r["result_index"]): r for r in history if (r["item_id"], r["result_index"]) in shown_removed
    }
    return {
        "recipe": plan.recipe_name,
        "model": plan.model,
        "dtype": plan.dtype,
        "out_dir": str(plan.out_dir),
        "plan_hash": plan.plan_hash,
        # incremental datasets: each watermark (when recorded, entries) and the rows it selects now
        "incremental": [d.as_dict() for d in plan.incremental.datasets] if plan.incremental is not None else [],
        "retained_items": len(plan.retained_item_ids),
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
            {
                "item_id": i.item_id,
                "key": i.key,
                "results": i.number_results,
                "references": len(i.references),
                "error": i.error,
            }
            for i in plan.items
        ],
        "diff": {
            "new": [rid(r) for r in diff.new],
            "changed": [{"result": rid(r), "key": r.item.key, "fields": reasons} for r, reasons in diff.changed],
            "removed": [f"{item_id}#{index}" for item_id, index in diff.removed],
            # results the recipe no longer holds (`flowgen prune OUT_DIR` removes them), with their keys and files
            "removed_results": [
                {
                    "result": f"{item_id}#{index}",
                    "key": (recorded.get((item_id, index)) or {}).get("item_key"),
                    "path": ((recorded.get((item_id, index)) or {}).get("output") or {}).get("path"),
                }
                for item_id, index in diff.removed[:SHOW_ITEMS]
            ],
        },
        "batches": [
            {
                "signature": b.signature.label,
                "size": b.size,
                "padding": b.padding,
                "reference_sets": len({r.job.reference_set for r in b.results}),
                "prompts": len({r.job.prompt for r in b.results}),
                "results": [rid(r) for r in b.results],
            }
            for b in batches
        ],
        "cost": cost_estimate(batches, list(history)),
    }


def incremental_line(watermark: dict[str, Any], retained: int) -> str:
    """'incremental products: watermark of 2026-12-03 03:00 UTC holds 40 rows; 3 of 43 rows new (planned), ...'."""
    unit = "files" if watermark["kind"] == "files" else "rows"
    when = (
        f"watermark of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(watermark['recorded_at']))} "
        f"holds {watermark['watermark_rows']} {unit}"
        if watermark["recorded_at"]
        else "no watermark recorded yet"
    )
    return (
        f"incremental {watermark['dataset']}: {when}; {watermark['new_rows']} of {watermark['rows']} {unit} new "
        f"(planned), {retained} item(s) left to earlier runs"
    )


def print_plan(report: dict[str, Any]) -> None:
    counts = report["counts"]
    click.echo(f"recipe {report['recipe']} -> {report['out_dir']}  (model {report['model']}, {report['dtype']})")
    click.echo(
        f"{counts['items']} item(s), {counts['results']} result(s): {counts['new']} new, "
        f"{counts['unchanged']} unchanged, {counts['changed']} changed, {counts['removed']} removed in the manifest"
    )
    for watermark in report.get("incremental", []):
        click.echo(incremental_line(watermark, report.get("retained_items", 0)))
    for item in report["items"][:SHOW_ITEMS]:
        refs = f", {item['references']} ref(s)" if item["references"] else ""
        click.echo(f"  {item['item_id']}  {item['key']}  ({item['results']} result(s){refs})")
    if len(report["items"]) > SHOW_ITEMS:
        click.echo(f"  ... {len(report['items']) - SHOW_ITEMS} more")
    for change in report["diff"]["changed"][:SHOW_ITEMS]:
        click.echo(f"  changed {change['result']} {change['key']}: {', '.join(change['fields'])}")
    if counts["removed"]:
        click.echo(
            f"{counts['removed']} result(s) in the manifest no longer in the recipe "
            f"({report.get('prune_command') or 'flowgen prune ' + report['out_dir']} removes their files and rows):"
        )
        for gone in report["diff"]["removed_results"]:
            click.echo(
                f"  removed {gone['result']} {gone['key'] or ''}" + (f" ({gone['path']})" if gone["path"] else "")
            )
        if counts["removed"] > len(report["diff"]["removed_results"]):
            click.echo(f"  ... {counts['removed'] - len(report['diff']['removed_results'])} more")
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
    estimate = report["cost"]
    if counts["to_run"]:
        unknown = estimate["results_without_estimate"]
        known = (
            f"≈ {estimate['engine_seconds']:.1f} engine-s, ${estimate['usd']:.4f} at ${estimate['rate_per_second']}/s"
            if unknown < counts["to_run"]
            else "no estimate yet"
        )
        click.echo(
            f"estimated cost: {known}"
            + (f" ({unknown} result(s) of shapes not yet run here not counted)" if unknown else "")
        )
