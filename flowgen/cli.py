"""The `flowgen` command line.

Thin by design: each command parses its options and calls one function in the workflow layer.
User errors (FlowgenError) become one line on stderr and exit code 2; no tracebacks.
"""

from __future__ import annotations

import functools
import sys

import click

from flowgen import __version__
from flowgen.errors import FlowgenError


def user_errors(fn):
    """Turn FlowgenError into `error: ...` + exit 2 (one line per problem)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlowgenError as err:
            problems = getattr(err, "problems", None) or [str(err)]
            for problem in problems:
                click.echo(f"error: {problem}", err=True)
            sys.exit(err.exit_code)

    return wrapper


max_batch_option = click.option(
    "--max-batch", type=click.IntRange(min=1, max=1024),
    help="Largest batch per engine call, rounded down to a power of two (default: $FLOWGEN_MAX_BATCH, else 8).")
# A plain string checked by the command (flowgen.run.dtype): a bad value is one `error:` line.
DTYPE_METAVAR = "[auto|float32|bfloat16]"
dtype_option = click.option(
    "--dtype", metavar=DTYPE_METAVAR,
    help="Compute dtype; auto is bfloat16 on GPU/TPU, float32 on CPU (default: $FLOWGEN_DTYPE, else auto). "
         "Part of each result's identity.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowgen")
def main():
    """flowgen — declarative batch image generation and editing with FLUX.2 [klein]."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field, e.g. task.steps=8.")
@user_errors
def validate(recipe, overrides):
    """Check RECIPE and report every problem at once."""
    from flowgen.commands import validate_command

    validate_command(recipe, list(overrides))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default: the recipe's output.dir).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@max_batch_option
@dtype_option
@user_errors
def plan(recipe, out_dir, overrides, as_json, max_batch, dtype):
    """Dry run: items, results, batches, and the diff against the output folder."""
    from flowgen.commands import plan_command

    plan_command(recipe, out_dir, list(overrides), as_json, max_batch, dtype)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default: the recipe's output.dir).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--limit", type=click.IntRange(min=1), help="Run at most N results.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed item.")
@max_batch_option
@dtype_option
@click.option("--budget", type=float, metavar="USD",
              help="Stop before a batch would take the run's engine-time cost past USD "
                   "(rate: $FLOWGEN_COST_PER_DEVICE_SECOND, default 0.0007).")
@click.option("--deliver-flagged", is_flag=True, help="Deliver results the content check flagged too (default: withhold them).")
@click.option("--detach", is_flag=True, help="Run in the background; print the run id at once (as deliveryMethod: async).")
@click.option("--run-id", hidden=True)  # the detached child's id, chosen by the parent
@user_errors
def run(recipe, out_dir, overrides, limit, fail_fast, max_batch, dtype, budget, deliver_flagged, detach, run_id):
    """Run RECIPE: render every missing or changed result, deliver it, and update the manifest."""
    from flowgen.commands import run_command

    sys.exit(run_command(recipe, out_dir, list(overrides), limit, fail_fast, max_batch, dtype, budget=budget,
                         deliver_flagged=deliver_flagged, detach=detach, run_id=run_id))


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@user_errors
def status(out_dir, as_json):
    """Summarise the manifest of OUT_DIR."""
    from flowgen.commands import status_command

    status_command(out_dir, as_json)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.argument("targets", nargs=-1, required=True)
@click.option("--verify", is_flag=True, help="Compare sha256 with the recorded output.")
@click.option("--to", "to_dir", type=click.Path(file_okay=False), help="Write regenerated files here (default: OUT_DIR/regen).")
@click.option("--dtype", metavar=DTYPE_METAVAR,
              help="Render in this dtype instead of the one recorded for each result (--verify then compares across dtypes).")
@user_errors
def regen(out_dir, targets, verify, to_dir, dtype):
    """Regenerate items (by id, or from image files carrying flowgen metadata)."""
    from flowgen.commands import regen_command

    sys.exit(regen_command(out_dir, list(targets), verify, to_dir, dtype))


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--flagged", is_flag=True, help="Also send results the content check withheld.")
@user_errors
def redeliver(out_dir, flagged):
    """Send again every upload and webhook of OUT_DIR that failed (exit 1 if some fail again)."""
    from flowgen.commands import redeliver_command

    sys.exit(redeliver_command(out_dir, flagged))


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="List what would be removed.")
@user_errors
def gc(out_dir, dry_run):
    """Remove URL results of OUT_DIR whose ttl has run out (recorded; a rerun leaves them gone)."""
    from flowgen.commands import gc_command

    gc_command(out_dir, dry_run)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report here (default: OUT_DIR/report.html).")
@user_errors
def report(out_dir, output):
    """Write a self-contained HTML report of OUT_DIR's results and print its path."""
    from flowgen.commands import report_command

    report_command(out_dir, output)


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--once", is_flag=True, help="Run the recipes that are due now, then exit (for system cron or a systemd timer).")
@max_batch_option
@dtype_option
@user_errors
def schedule(recipes, once, max_batch, dtype):
    """Run each RECIPE whenever its `schedule` is due, and wait for the next."""
    from flowgen.commands import schedule_command

    sys.exit(schedule_command(list(recipes), once, max_batch, dtype))


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--recipe", type=click.Path(dir_okay=False), help="Compare with this recipe (default: the one the last run used).")
@click.option("--yes", is_flag=True, help="Remove them (without it, only list what would be removed).")
@user_errors
def prune(out_dir, recipe, yes):
    """Remove results of OUT_DIR that its recipe no longer holds: their files and manifest rows."""
    from flowgen.commands import prune_command

    prune_command(out_dir, recipe, yes)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@user_errors
def models(as_json):
    """List the model cards: AIR ids, whether their weights are on this machine, how to fetch them."""
    from flowgen.commands import models_command

    models_command(as_json)


@main.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite files that already exist.")
@user_errors
def init(directory, force):
    """Write a starter recipe with sample data into DIRECTORY."""
    from flowgen.commands import init_command

    init_command(directory, force)


if __name__ == "__main__":
    main()
