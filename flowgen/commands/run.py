"""`flowgen run RECIPE`: render every missing or changed result and update the manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import click

from flowgen.errors import FlowgenError
from flowgen.plan.from_recipe import plan_recipe, recipe_source
from flowgen.run.crash import one_line
from flowgen.run.distributed import DistributedSettings
from flowgen.run.dtype import dtype_setting, resolve_dtype
from flowgen.run.engine import PipelineEngine
from flowgen.run.executor import RunSummary, against_folder, execute, new_run_id, preflight
from flowgen.run.interrupt import StopRequest
from flowgen.run.lock import folder_busy_check
from flowgen.run.manifest import Manifest, load_watermarks, run_log_path
from flowgen.run.merge import fold_shards
from flowgen.run.progress import default_progress
from flowgen.run.settings import max_batch_setting
from flowgen.run.shards import SHARD_ENV, Shard

DELIVERY_FAILED_EXIT = 3  # --require-delivery: every result is fine, but a delivery gave up


def run_command(
    recipe: str,
    out_dir: str | None,
    overrides: Sequence[str],
    limit: int | None,
    fail_fast: bool,
    max_batch: int | None = None,
    dtype: str | None = None,
    *,
    budget: float | None = None,
    deliver_flagged: bool = False,
    detach: bool = False,
    run_id: str | None = None,
    require_delivery: bool = False,
    out_from_recipe: bool = False,
    shard: str | None = None,
    ray_address: str | None = None,
    distributed: DistributedSettings | None = None,
    canary_wait: float | None = None,
) -> int:
    """Run RECIPE; returns the exit code (0 all ok, 1 some failed, 3 with require_delivery when a
    delivery gave up, 130 after Ctrl-C).

    max_batch: --max-batch (None: $FLOWGEN_MAX_BATCH, else 8).
    dtype: --dtype (None: $FLOWGEN_DTYPE, else auto). detach (or deliveryMethod async on every
    task): validate, plan and make every refusal here, then run in a background process and return
    its run id at once. run_id: set in that background process (the id its parent printed), which is
    always given the output folder (out_from_recipe: the user gave no --out, the recipe named it).
    Many processes (flowgen.run.shards): shard ('K/N', else $FLOWGEN_SHARD) runs that share of the
    plan, waiting at most canary_wait seconds (None: the default) for the shard that checks the
    canary (flowgen.run.shard_canary); ray_address ('local' for a cluster of its own) renders the
    batches on a Ray actor pool (flowgen.run.ray_runner); distributed makes this process one of a
    multi-controller JAX job that renders every batch on one mesh over all the processes' devices
    (flowgen.run.distributed).
    User errors before anything runs raise FlowgenError (exit 2 via the CLI); a crash raises
    RunCrashed (exit 70) once the run is recorded as failed.
    """
    try:
        spread = _spread(shard, ray_address, distributed, detach)  # bad options: refused before anything is read
        if isinstance(spread, DistributedSettings):
            from flowgen.run.distributed import run_distributed

            return run_distributed(
                spread,
                lambda share, stop: _run(
                    recipe,
                    out_dir,
                    overrides,
                    limit,
                    fail_fast,
                    max_batch,
                    dtype,
                    budget,
                    deliver_flagged,
                    False,
                    run_id,
                    require_delivery,
                    out_from_recipe,
                    share,
                    stop=stop,
                    canary_wait=canary_wait,
                ),
            )
        return _run(
            recipe,
            out_dir,
            overrides,
            limit,
            fail_fast,
            max_batch,
            dtype,
            budget,
            deliver_flagged,
            detach,
            run_id,
            require_delivery,
            out_from_recipe,
            spread,
            canary_wait=canary_wait,
        )[0]
    except BaseException as err:
        if run_id is not None and out_dir is not None:  # a detached run: its death is recorded for `status`
            _record_unstarted_death(out_dir, run_id, err)
        raise


def _spread(
    shard: str | None, ray_address: str | None, distributed: DistributedSettings | None, detach: bool
) -> Shard | str | DistributedSettings | None:
    """How the run is spread over processes: a Shard, a Ray address, distributed settings, or None (here alone)."""
    sharded = shard is not None or bool(os.environ.get(SHARD_ENV))
    chosen = [
        flag
        for flag, given in (
            ("--shard" if shard is not None else f"${SHARD_ENV}", sharded),
            ("--ray", ray_address is not None),
            ("--distributed", distributed is not None),
        )
        if given
    ]
    if len(chosen) > 1:
        raise FlowgenError(
            f"{' and '.join(chosen)} cannot be combined: --shard K/N runs one share, --distributed "
            "renders every batch with the other JAX processes on one mesh, --ray renders every batch on a Ray cluster"
        )
    if chosen and detach:
        raise FlowgenError(
            f"--detach cannot be combined with {chosen[0]}: the launcher (SLURM, Kubernetes, Ray) keeps "
            "the process; run it in the foreground"
        )
    if distributed is not None:
        return distributed
    if ray_address is not None:
        return ray_address
    return Shard.from_option(shard)


def _run(
    recipe,
    out_dir,
    overrides,
    limit,
    fail_fast,
    max_batch,
    dtype,
    budget,
    deliver_flagged,
    detach,
    run_id,
    require_delivery,
    out_from_recipe,
    spread=None,
    *,
    stop=None,
    canary_wait=None,
) -> tuple[int, Path]:
    """(exit code, output folder) of the run."""
    compute_dtype = resolve_dtype(dtype_setting(dtype))  # JAX decides "auto": it runs the batches
    plan = plan_recipe(
        recipe, out_dir, overrides, max_batch_setting(max_batch), compute_dtype, watermarks=load_watermarks
    )
    # recorded with the run: `prune` plans again with the same --set options, `status` says --out in its hints
    plan = replace(plan, source=recipe_source(recipe, overrides, out_dir is not None and not out_from_recipe))
    engine = PipelineEngine(plan.engine_model, plan.dtype)  # loads on the first batch only
    plan = replace(plan, batch_multiple=_batch_multiple(engine))  # whole rows for every device of the mesh
    share = spread if isinstance(spread, Shard) else None
    if share is not None and canary_wait is not None:  # how long it waits for the shard checking the canary
        share = replace(share, canary_wait=canary_wait)
    if share is None:
        fold_shards(plan.out_dir)  # a plain run reads, and then writes, what shard runs recorded (flowgen.run.merge)
    if run_id is None and spread is None and (detach or _all_async(plan)):
        preflight(
            against_folder(plan, verify_files=False), engine, limit
        )  # every refusal the run would make, made here
        return _detach(
            plan,
            recipe,
            out_dir is None,
            overrides,
            limit,
            fail_fast,
            max_batch,
            dtype,
            budget,
            deliver_flagged,
            require_delivery,
        ), plan.out_dir
    progress = default_progress()
    stop = stop or StopRequest(
        on_first=lambda: progress.note("stopping after the current batch (Ctrl-C again to abort)")
    )
    rendering = None
    if isinstance(spread, str):  # --ray: connected (or refused, one line) before anything is written
        from flowgen.run.ray_runner import RayRendering

        rendering = RayRendering.connect(plan, spread, progress)
    with stop, rendering or nullcontext():
        summary = execute(
            against_folder(plan),
            engine,
            limit=limit,
            fail_fast=fail_fast,
            progress=progress,
            stop=stop,
            budget=budget,
            deliver_flagged=deliver_flagged,
            run_id=run_id,
            share=share,
            render_batches=rendering,
        )
    shown = f"{plan.out_dir} (shard {share})" if share is not None else str(plan.out_dir)
    print_summary(
        summary, shown, engine.load_seconds if rendering is None else rendering.load_seconds, require_delivery
    )
    return exit_code(summary, require_delivery), plan.out_dir


def _batch_multiple(engine) -> int:
    """The engine's mesh "data" size (batch sizes are multiples of it); 1 when the mesh or the weights
    cannot be resolved here: the run's preflight reports that, if anything is left to render."""
    multiple = getattr(engine, "batch_multiple", None)  # stand-in engines have no mesh
    try:
        return multiple() if multiple is not None else 1
    except FlowgenError:
        return 1


def exit_code(summary: RunSummary, require_delivery: bool = False) -> int:
    """The run's exit code; with --require-delivery a run whose results are all fine but whose
    deliveries (some) gave up exits DELIVERY_FAILED_EXIT instead of 0."""
    if summary.exit_code == 0 and require_delivery and summary.deliveries.get("failed"):
        return DELIVERY_FAILED_EXIT
    return summary.exit_code


def _all_async(plan) -> bool:
    return bool(plan.items) and all(item.delivery.method == "async" for item in plan.items)


def _detach(
    plan,
    recipe,
    out_from_recipe,
    overrides,
    limit,
    fail_fast,
    max_batch,
    dtype,
    budget,
    deliver_flagged,
    require_delivery,
) -> int:
    """Start the run in its own session (it outlives this shell), print its id, return 0. The run is
    recorded as "starting" with its process id first, so `status` tells if it dies before it starts."""
    folder_busy_check(plan.out_dir)
    run_id = new_run_id()
    args = child_args(
        recipe,
        plan.out_dir,
        out_from_recipe,
        run_id,
        overrides,
        limit,
        fail_fast,
        max_batch,
        dtype,
        budget,
        deliver_flagged,
        require_delivery,
    )
    log_path = run_log_path(plan.out_dir, run_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with Manifest(plan.out_dir) as manifest:
        manifest.launch_run(run_id, plan.recipe_name, plan.recipe_hash, plan.plan_hash, str(log_path))
        try:
            with open(log_path, "ab") as log:
                child = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=dict(os.environ),
                )
        except OSError as err:
            manifest.fail_unstarted_run(run_id, f"could not start the background process: {err}")
            raise FlowgenError(f"cannot start the background run: {err}") from None
        manifest.set_run_pid(run_id, child.pid)
    click.echo(run_id)
    click.echo(
        f"running in the background; `flowgen status {_shown_out(plan.out_dir)}` shows its progress, log: {log_path}",
        err=True,
    )
    return 0


def child_args(
    recipe,
    out_dir,
    out_from_recipe,
    run_id,
    overrides,
    limit,
    fail_fast,
    max_batch,
    dtype,
    budget,
    deliver_flagged,
    require_delivery,
) -> list[str]:
    """The background process's command line: this run's options, the run id printed for it, and
    the output folder (so it can record its own death even when the recipe no longer plans)."""
    args = [sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--run-id", run_id, "--out", str(out_dir)]
    args += ["--out-from-recipe"] * out_from_recipe + [a for o in overrides for a in ("--set", o)]
    for flag, value in (("--limit", limit), ("--max-batch", max_batch), ("--dtype", dtype), ("--budget", budget)):
        if value is not None:
            args += [flag, str(value)]
    return (
        args
        + ["--fail-fast"] * fail_fast
        + ["--deliver-flagged"] * deliver_flagged
        + ["--require-delivery"] * require_delivery
    )


def _record_unstarted_death(out_dir: str, run_id: str, err: BaseException) -> None:
    """A detached run that ends before its run started (refused, or crashed while planning): its
    "starting" row becomes failed with the reason (a run that started has recorded its own end)."""
    from flowgen.run.manifest import manifest_path

    reason = str(err) if isinstance(err, FlowgenError) else one_line(err)
    if isinstance(err, SystemExit | KeyboardInterrupt):
        reason = "stopped before it started"
    try:
        if manifest_path(out_dir).exists():
            with Manifest(out_dir, create=False) as manifest:
                manifest.fail_unstarted_run(run_id, reason)
    except FlowgenError:  # the manifest itself is the problem: `status` reads the process as gone
        pass


def _shown_out(out_dir) -> str:
    """OUT_DIR as the user may type it: relative to here when it is below, else absolute."""
    relative = os.path.relpath(out_dir)
    return str(out_dir) if relative.startswith("..") else relative


def print_summary(summary: RunSummary, out_dir: str, load_seconds: float = 0.0, require_delivery: bool = False) -> None:
    """The end-of-run summary (stdout)."""
    parts = [f"{summary.rendered} rendered", f"{summary.unchanged} unchanged", f"{summary.failed} failed"]
    if summary.not_run:
        parts.append(f"{summary.not_run} not run")
    rate = f", {summary.images_per_second:.2f} img/s" if summary.rendered else ""
    load = f" (model load {load_seconds:.1f}s)" if load_seconds else ""
    click.echo(f"{out_dir}: {', '.join(parts)} in {summary.seconds:.1f}s{rate}{load}")
    if summary.spent:
        click.echo(
            f"  engine time cost ${summary.spent:.4f}"
            + (" — stopped: --budget would be exceeded by the next batch" if summary.budget_stopped else "")
        )
    if summary.flagged:
        click.echo(f"  {summary.flagged} result(s) flagged by the content check (kept on disk, not delivered)")
    delivered = summary.deliveries
    if any(delivered.values()):
        click.echo(
            f"  deliveries: {delivered.get('ok', 0)} ok, {delivered.get('failed', 0)} failed"
            + (f" (flowgen redeliver {out_dir})" if delivered.get("failed") else "")
            + (f", {delivered['withheld']} withheld" if delivered.get("withheld") else "")
        )
    if exit_code(summary, require_delivery) == DELIVERY_FAILED_EXIT:
        click.echo(
            f"error: {delivered['failed']} delivery(ies) gave up (--require-delivery: exit {DELIVERY_FAILED_EXIT})",
            err=True,
        )
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
        click.echo(
            f"  canary: {len(passed)} fixed item(s) render as their first renders did "
            f"(>= {passed[0]['threshold_db']:g} dB PSNR)"
        )
    for line in summary.canary_failures:  # loud: stderr, one line per drifted item
        click.echo(f"error: {line}", err=True)
    if summary.canary_failures:
        click.echo(
            "error: the canary failed, so nothing was rendered; see docs/recipes.md (Golden-seed canary)", err=True
        )
    if summary.stopped_early:
        click.echo("stopped early (--fail-fast)")
    if summary.interrupted:
        click.echo("interrupted: the manifest is consistent; run again to continue")
