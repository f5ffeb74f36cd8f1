"""`flowgen run RECIPE`: render every missing or changed result and update the manifest."""

from __future__ import annotations

from typing import Sequence

import click

from flowgen.plan.from_recipe import plan_recipe
from flowgen.run.dtype import dtype_setting, resolve_dtype
from flowgen.run.engine import PipelineEngine
from flowgen.run.executor import RunSummary, execute
from flowgen.run.interrupt import StopRequest
from flowgen.run.progress import default_progress


def run_command(recipe: str, out_dir: str | None, overrides: Sequence[str], limit: int | None, fail_fast: bool,
                max_batch: int | None = None, dtype: str | None = None) -> int:
    """Run RECIPE; returns the exit code (0 all ok, 1 some failed, 130 after Ctrl-C).

    dtype: --dtype (None: $FLOWGEN_DTYPE, else auto). User errors before anything runs raise
    FlowgenError (exit 2 via the CLI).
    """
    compute_dtype = resolve_dtype(dtype_setting(dtype))  # JAX decides "auto": it runs the batches
    plan = plan_recipe(recipe, out_dir, overrides, max_batch, compute_dtype)
    engine = PipelineEngine(plan.extra.get("card") or plan.model, plan.dtype)  # loads on the first batch only
    progress = default_progress()
    stop = StopRequest(on_first=lambda: progress.note("stopping after the current batch (Ctrl-C again to abort)"))
    with stop:
        summary = execute(plan, engine, limit=limit, fail_fast=fail_fast, progress=progress, stop=stop)
    print_summary(summary, str(plan.out_dir), engine.load_seconds)
    return summary.exit_code


def print_summary(summary: RunSummary, out_dir: str, load_seconds: float = 0.0) -> None:
    """The end-of-run summary (stdout)."""
    parts = [f"{summary.rendered} rendered", f"{summary.unchanged} unchanged", f"{summary.failed} failed"]
    if summary.not_run:
        parts.append(f"{summary.not_run} not run")
    rate = f", {summary.images_per_second:.2f} img/s" if summary.rendered else ""
    load = f" (model load {load_seconds:.1f}s)" if load_seconds else ""
    click.echo(f"{out_dir}: {', '.join(parts)} in {summary.seconds:.1f}s{rate}{load}")
    for run_id in summary.died_runs:
        click.echo(f"  run {run_id} had died without finishing (killed?); this run completed its work")
    for key, index, error in summary.failures[:20]:
        click.echo(f"  failed {key}#{index}: {error}")
    if len(summary.failures) > 20:
        click.echo(f"  ... {len(summary.failures) - 20} more failures (flowgen status {out_dir})")
    if summary.stopped_early:
        click.echo("stopped early (--fail-fast)")
    if summary.interrupted:
        click.echo("interrupted: the manifest is consistent; run again to continue")
