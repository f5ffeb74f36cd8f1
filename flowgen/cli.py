"""The `flowgen` command line.

Thin by design: each command parses its options and calls one function in the workflow layer.
User errors (FlowgenError) become one line on stderr and exit code 2; no tracebacks (a crashed run,
RunCrashed, is one line too, exit code 70, its traceback in the run's log).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import click

from flowgen import __version__
from flowgen.errors import FlowgenError, RunCrashed


def user_errors(fn):
    """Turn FlowgenError into `error: ...` + exit 2 (one line per problem), and RunCrashed (its
    traceback already logged) into its one line + exit 70."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FlowgenError, RunCrashed) as err:
            problems = getattr(err, "problems", None) or [str(err)]
            for problem in problems:
                click.echo(f"error: {problem}", err=True)
            sys.exit(err.exit_code)

    return wrapper


def help_epilog(examples: Sequence[str], exit_codes: Sequence[tuple[int, str]]) -> str:
    """The tail of a command's --help: examples and exit codes, as `\\b` blocks (click prints them as written)."""
    lines = ["\b", "Examples:", *(f"  {example}" for example in examples), "", "\b", "Exit codes:"]
    return "\n".join(lines + [f"  {code:<4} {meaning}" for code, meaning in exit_codes])


BAD_INPUT = (2, "bad input: one `error:` line per problem on stderr; nothing changed")

set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe field (repeatable), e.g. --set task.steps=8 --set seed=3.",
)
max_batch_option = click.option(
    "--max-batch",
    type=click.IntRange(min=1, max=1024),
    help="Largest batch per engine call, rounded down to a power of two (default: $FLOWGEN_MAX_BATCH, else 8).",
)
# A plain string checked by the command (flowgen.run.dtype): a bad value is one `error:` line.
DTYPE_METAVAR = "[auto|float32|bfloat16]"
dtype_option = click.option(
    "--dtype",
    metavar=DTYPE_METAVAR,
    help="Compute dtype; auto is bfloat16 on GPU/TPU, float32 on CPU (default: $FLOWGEN_DTYPE, else auto). "
    "Part of each result's identity.",
)
# Checked here (syntax; flowgen.engine.MeshSpec) and against the devices before anything is written.
mesh_option = click.option(
    "--mesh",
    metavar="data=D,model=M",
    help="Device mesh: data splits each batch's rows over the devices, model splits the transformer's weights "
    "(FSDP, for cards that cannot hold them); an axis left out fills the devices "
    "(default: $FLOWGEN_MESH, else every device on data). Recorded with each result, not hashed.",
)


def use_mesh(mesh: str | None) -> str | None:
    """--mesh checked (one `error:` line, exit 2) and handed to this process's engines and children."""
    if mesh is None:
        return None
    import os

    from flowgen.engine import MeshSpec

    MeshSpec.parse(mesh)
    os.environ["FLOWGEN_MESH"] = mesh  # the engines (flowgen.run.engine) and a detached run read it
    return mesh


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="`flowgen COMMAND --help` shows a command's options, examples and exit codes; "
    "docs/cli.md describes every command and environment variable.",
)
@click.version_option(__version__, prog_name="flowgen")
def main():
    """flowgen — declarative batch image generation and editing with FLUX.2 [klein].

    \b
    Start here:
      flowgen init starter && cd starter     # a starter recipe with sample data
      flowgen validate recipe.yaml           # every problem at once
      flowgen plan recipe.yaml               # what a run would do
      flowgen run recipe.yaml                # render it
    """


@main.command(
    epilog=help_epilog(
        [
            "flowgen validate recipes/product-photos.yaml",
            "flowgen validate recipe.yaml --set task.steps=8 --set seed=3",
        ],
        [
            (0, "valid (a `note:` line says if the model's weights are not on this machine)"),
            (2, "problems found: one `error:` line each, naming the field or file"),
        ],
    )
)
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@user_errors
def validate(recipe, overrides):
    """Check RECIPE and report every problem at once."""
    from flowgen.commands import validate_command

    validate_command(recipe, list(overrides))


@main.command(
    epilog=help_epilog(
        [
            "flowgen plan recipes/product-photos.yaml",
            "flowgen plan recipe.yaml --set task.numberResults=1 --json | jq .counts",
        ],
        [(0, "plan printed (writes nothing, loads no weights; a `note:` says if they are missing here)"), BAD_INPUT],
    )
)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default: the recipe's output.dir)."
)
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@max_batch_option
@dtype_option
@user_errors
def plan(recipe, out_dir, overrides, as_json, max_batch, dtype):
    """Dry run: items, results, batches, and the diff against the output folder."""
    from flowgen.commands import plan_command

    plan_command(recipe, out_dir, list(overrides), as_json, max_batch, dtype)


@main.command(
    epilog=help_epilog(
        [
            "flowgen run recipes/quickstart.yaml",
            "flowgen run recipe.yaml --set task.numberResults=1 --limit 10",
            "flowgen run recipe.yaml --detach      # prints the run id at once",
            "flowgen run recipe.yaml --require-delivery   # from cron: non-zero when an upload or webhook gave up",
            "flowgen run recipe.yaml --shard 0/4   # one of 4 processes (SLURM array, Kubernetes indexed Job)",
            "flowgen run recipe.yaml --ray         # batches on a Ray actor pool (--ray=auto: the cluster here)",
        ],
        [
            (0, "every result rendered or unchanged (or left for later by --limit / --budget)"),
            (
                1,
                "some results failed (the others were rendered; `flowgen status` lists the failures), "
                "or --distributed: a peer process died (run every process again)",
            ),
            (
                2,
                "bad input, missing weights, a busy output folder (nothing was run), or a manifest that cannot be "
                "read or written (a corrupt file, a full disk: the data stays as it was)",
            ),
            (3, "--require-delivery: every result is fine, but a delivery gave up (`flowgen redeliver` resends it)"),
            (
                70,
                "the run crashed (an internal error): recorded as failed, "
                "the traceback is in OUT/.flowgen/logs/RUN_ID.log",
            ),
            (130, "interrupted (Ctrl-C): the manifest is consistent; run again to continue"),
        ],
    )
)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default: the recipe's output.dir)."
)
@set_option
@click.option("--limit", type=click.IntRange(min=1), help="Run at most N results.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed item.")
@max_batch_option
@dtype_option
@click.option(
    "--budget",
    type=float,
    metavar="USD",
    help="Stop before a batch would take the run's engine-time cost past USD "
    "(rate: $FLOWGEN_COST_PER_DEVICE_SECOND, default 0.0007).",
)
@click.option(
    "--deliver-flagged", is_flag=True, help="Deliver results the content check flagged too (default: withhold them)."
)
@click.option(
    "--detach",
    is_flag=True,
    help="Run in the background; print the run id at once (as deliveryMethod: async). "
    "Bad input, missing weights or a busy folder are refused first (exit 2).",
)
@click.option(
    "--require-delivery",
    is_flag=True,
    help="Exit 3 when every result is fine but an upload or webhook gave up after its retries "
    "(default: exit 0; the failed deliveries are recorded and `flowgen redeliver` resends them).",
)
@click.option(
    "--shard",
    metavar="K/N",
    help="Run shard K of N (0 <= K < N): this process's deterministic share of the plan's batches, recorded "
    "in its own manifest shard; `flowgen merge` folds them (default: $FLOWGEN_SHARD).",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    metavar="[ADDRESS]",
    help="Render the batches on a Ray actor pool (needs flowgen[ray]): alone, a local cluster of its own; "
    "--ray=auto the cluster running here; --ray=HOST:PORT or ray://HOST:10001 another one.",
)
@click.option(
    "--distributed",
    is_flag=True,
    help="One process of a multi-controller JAX job (jax.distributed): $FLOWGEN_COORDINATOR, "
    "$FLOWGEN_NUM_PROCESSES, $FLOWGEN_PROCESS_ID, or JAX's detection on TPU / SLURM; the processes "
    "render every batch on one device mesh over all their devices, each recording its devices' rows; "
    "process 0 merges.",
)
@click.option(
    "--heartbeat-timeout",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    metavar="SECONDS",
    help="--distributed: a peer silent this long is dead; the others stop with one line.",
)
@click.option(
    "--init-timeout",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    metavar="SECONDS",
    help="--distributed: how long to wait for every process (and the coordinator) to join.",
)
@click.option(
    "--canary-wait",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="--shard / --distributed: how long a shard waits for the shard that checks the recipe's canary "
    "(every shard renders only after it passed)  [default: 1800]",
)
@mesh_option
@click.option("--run-id", hidden=True)  # the detached child's id, chosen by the parent
@click.option("--out-from-recipe", is_flag=True, hidden=True)  # the detached child's --out is the recipe's own
@user_errors
def run(
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
    require_delivery,
    shard,
    ray_address,
    distributed,
    heartbeat_timeout,
    init_timeout,
    canary_wait,
    mesh,
    run_id,
    out_from_recipe,
):
    """Run RECIPE: render every missing or changed result, deliver it, and update the manifest."""
    from flowgen.commands import run_command
    from flowgen.run.distributed import DistributedSettings

    use_mesh(mesh)

    settings = DistributedSettings(heartbeat_timeout, init_timeout) if distributed else None
    sys.exit(
        run_command(
            recipe,
            out_dir,
            list(overrides),
            limit,
            fail_fast,
            max_batch,
            dtype,
            budget=budget,
            deliver_flagged=deliver_flagged,
            detach=detach,
            run_id=run_id,
            require_delivery=require_delivery,
            out_from_recipe=out_from_recipe,
            shard=shard,
            ray_address=ray_address,
            distributed=settings,
            canary_wait=canary_wait,
        )
    )


@main.command(
    epilog=help_epilog(
        ["flowgen status out/quickstart", "flowgen status out/quickstart --json"],
        [(0, "summary printed"), (2, "OUT_DIR holds no flowgen manifest, or one that cannot be read (a corrupt file)")],
    )
)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@user_errors
def status(out_dir, as_json):
    """What OUT_DIR holds against what its recipe planned: ok, failed, not rendered yet, removed."""
    from flowgen.commands import status_command

    status_command(out_dir, as_json)


@main.command(
    epilog=help_epilog(
        [
            "flowgen regen out/shoes 35f25bbdf15c --verify      # every result of an item",
            "flowgen regen out/shoes 35f25bbdf15c#1 --to /tmp/again",
            "flowgen regen out/shoes out/shoes/A-100_linen_0.webp",
        ],
        [
            (0, "every target regenerated (with --verify: byte-identical to its record)"),
            (1, "a result could not be regenerated, or (--verify) its sha256 differs"),
            (2, "bad input: no manifest in OUT_DIR, or a target it does not hold"),
        ],
    )
)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.argument("targets", nargs=-1, required=True)
@click.option("--verify", is_flag=True, help="Compare sha256 with the recorded output.")
@click.option(
    "--to", "to_dir", type=click.Path(file_okay=False), help="Write regenerated files here (default: OUT_DIR/regen)."
)
@click.option(
    "--dtype",
    metavar=DTYPE_METAVAR,
    help="Render in this dtype instead of the one recorded for each result (--verify then compares across dtypes).",
)
@mesh_option
@user_errors
def regen(out_dir, targets, verify, to_dir, dtype, mesh):
    """Regenerate results of OUT_DIR from their manifest records.

    \b
    Each TARGET is one of:
      ID      an item id (as `plan` and `status` print it): all its results
      ID#N    one result of the item, N its result index (from 0)
      FILE    an image flowgen wrote (it carries the item id and result index)
    """
    from flowgen.commands import regen_command

    sys.exit(regen_command(out_dir, list(targets), verify, to_dir, dtype, use_mesh(mesh)))


@main.command(
    epilog=help_epilog(
        ["flowgen redeliver out/shoes", "flowgen redeliver out/shoes --flagged"],
        [
            (0, "everything sent now arrived (or nothing was left to send)"),
            (1, "some deliveries failed again (recorded; run it again later)"),
            (2, "bad input: no manifest in OUT_DIR, or a run holds the folder"),
        ],
    )
)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--flagged", is_flag=True, help="Also send results the content check withheld.")
@user_errors
def redeliver(out_dir, flagged):
    """Send again every upload and webhook of OUT_DIR that failed (exit 1 if some fail again)."""
    from flowgen.commands import redeliver_command

    sys.exit(redeliver_command(out_dir, flagged))


@main.command(
    epilog=help_epilog(
        ["flowgen gc out/shoes --dry-run", "flowgen gc out/shoes"],
        [(0, "done (or listed, with --dry-run)"), (2, "bad input: no manifest in OUT_DIR, or a run holds the folder")],
    )
)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="List what would be removed.")
@user_errors
def gc(out_dir, dry_run):
    """Remove URL results of OUT_DIR whose ttl has run out (recorded; a rerun leaves them gone)."""
    from flowgen.commands import gc_command

    gc_command(out_dir, dry_run)


@main.command(
    epilog=help_epilog(
        [
            "flowgen report out/shoes           # writes out/shoes/report.html",
            "flowgen report out/shoes -o /tmp/shoes.html",
        ],
        [
            (0, "report written; its path printed"),
            (2, "bad input: no manifest in OUT_DIR, or the file cannot be written"),
        ],
    )
)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Write the report here (default: OUT_DIR/report.html)."
)
@user_errors
def report(out_dir, output):
    """Write a self-contained HTML report of OUT_DIR's results and print its path."""
    from flowgen.commands import report_command

    report_command(out_dir, output)


@main.command(
    epilog=help_epilog(
        [
            "flowgen schedule recipes/nightly.yaml         # runs when due, waits for the next",
            "flowgen schedule --once recipes/*.yaml        # from system cron or a systemd timer",
            "flowgen schedule --once recipes/nightly.yaml --set task.steps=8",
        ],
        [
            (0, "every run that was due succeeded (or nothing was due: each recipe's next run is printed)"),
            (1, "a run failed (or its canary found the renders changed)"),
            (
                2,
                "bad input: a bad recipe or --set, none of the recipes has a schedule (others without one are "
                "skipped with a note), or another run holds its folder",
            ),
            (130, "interrupted (Ctrl-C)"),
        ],
    )
)
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--once", is_flag=True, help="Run the recipes that are due now, then exit (for system cron or a systemd timer)."
)
@set_option
@max_batch_option
@dtype_option
@user_errors
def schedule(recipes, once, overrides, max_batch, dtype):
    """Run each RECIPE whenever its `schedule` is due, and wait for the next."""
    from flowgen.commands import schedule_command

    sys.exit(schedule_command(list(recipes), once, max_batch, dtype, list(overrides)))


@main.command(
    epilog=help_epilog(
        ["flowgen prune out/shoes              # lists what would be removed", "flowgen prune out/shoes --yes"],
        [(0, "listed (or removed, with --yes)"), (2, "bad input: no manifest in OUT_DIR, or a run holds the folder")],
    )
)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--recipe", type=click.Path(dir_okay=False), help="Compare with this recipe (default: the one the last run used)."
)
@click.option("--yes", is_flag=True, help="Remove them (without it, only list what would be removed).")
@user_errors
def prune(out_dir, recipe, yes):
    """Remove results of OUT_DIR that its recipe no longer holds: their files and manifest rows."""
    from flowgen.commands import prune_command

    prune_command(out_dir, recipe, yes)


@main.command(
    epilog=help_epilog(
        ["flowgen merge out/shoes            # after `flowgen run recipe.yaml --shard K/N` on every process"],
        [
            (0, "folded (shards still running are folded as far as they got, and kept)"),
            (2, "bad input: OUT_DIR holds neither a manifest nor shard manifests, or one cannot be read"),
        ],
    )
)
@click.argument("out_dir", type=click.Path(file_okay=False))
@user_errors
def merge(out_dir):
    """Fold the manifest shards of `run --shard` / `--distributed` into OUT_DIR's manifest (idempotent)."""
    from flowgen.commands import merge_command

    merge_command(out_dir)


@main.command(
    epilog=help_epilog(
        ["flowgen models", "flowgen models --json | jq '.[] | {name, present: .weights.present}'"],
        [(0, "listed (whether or not the weights are here)"), (2, "a model card file is invalid")],
    )
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@user_errors
def models(as_json):
    """List the model cards: AIR ids, whether their weights are on this machine, how to fetch them."""
    from flowgen.commands import models_command

    models_command(as_json)


@main.command(
    epilog=help_epilog(
        ["flowgen init starter && cd starter && flowgen run recipe.yaml", "flowgen init . --force"],
        [
            (0, "starter files written; what to run next printed"),
            (2, "a file already exists (nothing written; --force overwrites) or cannot be written"),
        ],
    )
)
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite files that already exist.")
@user_errors
def init(directory, force):
    """Write a starter recipe with sample data into DIRECTORY."""
    from flowgen.commands import init_command

    init_command(directory, force)


@main.command(
    epilog=help_epilog(
        [
            "flowgen serve                                   "
            "# http://127.0.0.1:8080/v1, every card whose weights are here",
            "flowgen serve --model flowgen:1@1               # the embedded tiny model (no weights needed)",
            "flowgen serve --host 0.0.0.0 --model runware:400@6  # needs $FLOWGEN_API_KEYS or $FLOWGEN_API_KEY_FILE",
        ],
        [
            (0, "stopped with Ctrl-C after finishing (or failing) every accepted task"),
            (
                2,
                "bad input: no API key for a non-loopback --host, an unknown --model or one without its weights, "
                "an unusable --data-dir",
            ),
        ],
    )
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; other than loopback only with $FLOWGEN_API_KEYS or $FLOWGEN_API_KEY_FILE.",
)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="CARD",
    help="Serve this model (card name or AIR id; repeatable); its weights must be on this machine. "
    "Default: every model card whose weights are here.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Where tasks, results and images are kept (default: `serve` in flowgen's cache folder, $FLOWGEN_CACHE).",
)
@max_batch_option
@click.option(
    "--window-ms",
    default=50.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Longest a task waits for others to share its batch.",
)
@dtype_option
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="HOST|CIDR",
    help="Let reference-image URLs, webhookURL and uploadEndpoint reach this non-public host name, "
    "address or range (repeatable; adds to $FLOWGEN_ALLOW_HOSTS). Default: public addresses only.",
)
@mesh_option
@user_errors
def serve(host, port, models, data_dir, max_batch, window_ms, dtype, allow_hosts, mesh):
    """Answer Runware imageInference tasks (REST POST /v1 and WebSocket /v1), batching across clients."""
    from flowgen.commands import serve_command

    use_mesh(mesh)
    serve_command(host, port, models, data_dir, max_batch, window_ms, dtype, allow_hosts=allow_hosts)


@main.command(
    epilog=help_epilog(
        [
            "flowgen convert ~/.cache/huggingface/hub/models--black-forest-labs--FLUX.2-klein-9B/snapshots/REV k9b",
            "flowgen convert flux-2-klein-9b.safetensors klein-9b-transformer --dtype bfloat16",
        ],
        [(0, "written"), (2, "bad input: unreadable or foreign weights, OUT exists or cannot be written")],
    )
)
@click.argument("weights", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    help="Stored dtype (default: the weights' own: bfloat16 stays bfloat16, float32 and float16 become float32).",
)
@user_errors
def convert(weights, out, dtype):
    """Convert released transformer WEIGHTS (a diffusers folder or a BFL file) into OUT, an Orbax checkpoint
    in the engine's layout that loads straight into the device mesh (a pipeline folder stays one)."""
    from flowgen.commands import convert_command

    sys.exit(convert_command(weights, out, dtype))


if __name__ == "__main__":
    main()
