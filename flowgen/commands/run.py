"""`flowgen run RECIPE`: render every missing or changed result and update the manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import click

from flowgen.plan.from_recipe import plan_recipe
from flowgen.run.dtype import dtype_setting, resolve_dtype
from flowgen.run.engine import PipelineEngine
from flowgen.run.executor import RunSummary, execute, new_run_id
from flowgen.run.lock import folder_busy_check
from flowgen.run.manifest import STATE_DIR, load_watermarks
from flowgen.run.interrupt import StopRequest
from flowgen.run.progress import default_progress
from flowgen.run.settings import max_batch_setting


def run_command(recipe: str, out_dir: str | None, overrides: Sequence[str], limit: int | None, fail_fast: bool,
                max_batch: int | None = None, dtype: str | None = None, *, budget: float | None = None,
                deliver_flagged: bool = False, detach: bool = False, run_id: str | None = None) -> int:
    """Run RECIPE; returns the exit code (0 all ok, 1 some failed, 130 after Ctrl-C).

    max_batch: --max-batch (None: $FLOWGEN_MAX_BATCH, else 8).
    dtype: --dtype (None: $FLOWGEN_DTYPE, else auto). detach (or deliveryMethod async on every
    task): validate and plan here, then run in a background process and return its run id at once.
    User errors before anything runs raise FlowgenError (exit 2 via the CLI).
    """
    compute_dtype = resolve_dtype(dtype_setting(dtype))  # JAX decides "auto": it runs the batches
    plan = plan_recipe(recipe, out_dir, overrides, max_batch_setting(max_batch), compute_dtype, watermarks=load_watermarks)
    plan.extra["recipe_overrides"] = list(overrides)  # recorded with the run: `prune` replans the same way
    if run_id is None and (detach or _all_async(plan)):
        return _detach(plan, recipe, overrides, limit, fail_fast, max_batch, dtype, budget, deliver_flagged)
    engine = PipelineEngine(plan.extra.get("card") or plan.model, plan.dtype)  # loads on the first batch only
    progress = default_progress()
    stop = StopRequest(on_first=lambda: progress.note("stopping after the current batch (Ctrl-C again to abort)"))
    with stop:
        summary = execute(plan, engine, limit=limit, fail_fast=fail_fast, progress=progress, stop=stop,
                          budget=budget, deliver_flagged=deliver_flagged, run_id=run_id)
    print_summary(summary, str(plan.out_dir), engine.load_seconds)
    return summary.exit_code


def _all_async(plan) -> bool:
    return bool(plan.items) and all(item.task.get("deliveryMethod") == "async" for item in plan.items)


def _detach(plan, recipe, overrides, limit, fail_fast, max_batch, dtype, budget, deliver_flagged) -> int:
    """Start the run in its own session (it outlives this shell), print its id, return 0."""
    folder_busy_check(plan.out_dir)
    run_id = new_run_id()
    args = [sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--out", str(plan.out_dir), "--run-id", run_id]
    args += [a for o in overrides for a in ("--set", o)]
    for flag, value in (("--limit", limit), ("--max-batch", max_batch), ("--dtype", dtype), ("--budget", budget)):
        if value is not None:
            args += [flag, str(value)]
    args += ["--fail-fast"] * fail_fast + ["--deliver-flagged"] * deliver_flagged
    log_dir = Path(plan.out_dir) / STATE_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{run_id}.log"
    with open(log_path, "ab") as log:
        subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         env=dict(os.environ))
    click.echo(run_id)
    click.echo(f"running in the background; `flowgen status {plan.out_dir}` shows its progress, log: {log_path}",
               err=True)
    return 0


def print_summary(summary: RunSummary, out_dir: str, load_seconds: float = 0.0) -> None:
    """The end-of-run summary (stdout)."""
    parts = [f"{summary.rendered} rendered", f"{summary.unchanged} unchanged", f"{summary.failed} failed"]
    if summary.not_run:
        parts.append(f"{summary.not_run} not run")
    rate = f", {summary.images_per_second:.2f} img/s" if summary.rendered else ""
    load = f" (model load {load_seconds:.1f}s)" if load_seconds else ""
    click.echo(f"{out_dir}: {', '.join(parts)} in {summary.seconds:.1f}s{rate}{load}")
    if summary.spent:
        click.echo(f"  engine time cost ${summary.spent:.4f}" + (" — stopped: --budget would be exceeded by the next batch"
                                                                 if summary.budget_stopped else ""))
    if summary.flagged:
        click.echo(f"  {summary.flagged} result(s) flagged by the content check (kept on disk, not delivered)")
    delivered = summary.deliveries
    if any(delivered.values()):
        click.echo(f"  deliveries: {delivered.get('ok', 0)} ok, {delivered.get('failed', 0)} failed"
                   + (f" (flowgen redeliver {out_dir})" if delivered.get("failed") else "")
                   + (f", {delivered['withheld']} withheld" if delivered.get("withheld") else ""))
    if summary.removed:
        click.echo(f"  {summary.removed} result(s) no longer in the recipe: flowgen prune {out_dir} removes them")
    for run_id in summary.died_runs:
        click.echo(f"  run {run_id} had died without finishing (killed?); this run completed its work")
    for key, index, error in summary.failures[:20]:
        click.echo(f"  failed {key}#{index}: {error}")
    if len(summary.failures) > 20:
        click.echo(f"  ... {len(summary.failures) - 20} more failures (flowgen status {out_dir})")
    passed = [v for v in summary.canary if v["passed"]]
    if passed:
        click.echo(f"  canary: {len(passed)} fixed item(s) render as their first renders did "
                   f"(>= {passed[0]['threshold_db']:g} dB PSNR)")
    for line in summary.canary_failures:  # loud: stderr, one line per drifted item
        click.echo(f"error: {line}", err=True)
    if summary.canary_failures:
        click.echo("error: the canary failed, so nothing was rendered; see docs/recipes.md (Golden-seed canary)", err=True)
    if summary.stopped_early:
        click.echo("stopped early (--fail-fast)")
    if summary.interrupted:
        click.echo("interrupted: the manifest is consistent; run again to continue")
