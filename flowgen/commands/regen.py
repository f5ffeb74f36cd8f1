"""`flowgen regen OUT_DIR TARGET...`: re-render recorded results; `--verify` compares sha256."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import click

from flowgen.run.dtype import checked_dtype, resolve_dtype
from flowgen.run.manifest import Manifest
from flowgen.run.merge import fold_shards
from flowgen.run.regen import cost_line, regenerate, resolve_targets


def regen_command(
    out_dir: str,
    targets: Sequence[str],
    verify: bool,
    to_dir: str | None,
    dtype: str | None = None,
    mesh: str | None = None,
) -> int:
    """Regenerate TARGETS (item ids, ID#N, or image files) of OUT_DIR into TO_DIR (default OUT_DIR/regen).

    dtype: --dtype for every result (None: the dtype recorded for each; $FLOWGEN_DTYPE is not read,
    so a replay is faithful by default). Returns 0, or 1 when a result could not be regenerated or
    (with verify) its sha256 differs. Ends with what the replay cost (cost_line): each engine call
    computes a whole batch of the recorded size, however few of its results were asked for.
    mesh: --mesh for every result (None: $FLOWGEN_MESH, else each result's recorded mesh where this
    machine can hold it; a line says which mesh was used where it could not).
    """
    compute_dtype = resolve_dtype(checked_dtype(dtype, f"--dtype {dtype!r}")) if dtype is not None else None
    fold_shards(out_dir)  # what shard runs recorded (flowgen.run.merge)
    with Manifest(out_dir, create=False) as manifest:
        records = resolve_targets(manifest, list(targets))
    destination = Path(to_dir) if to_dir else Path(out_dir) / "regen"
    started = time.perf_counter()
    outcomes = regenerate(records, destination, dtype=compute_dtype, mesh=mesh)
    seconds = time.perf_counter() - started
    code = 0
    for note in dict.fromkeys(o.mesh_note for o in outcomes if o.mesh_note):
        click.echo(f"note: {note}")
    for outcome in outcomes:
        name = f"{outcome.item_id}#{outcome.result_index}"
        # another dtype than recorded cannot reproduce the recorded bytes: say so on the line
        other = (
            f" at {outcome.dtype}, recorded at {outcome.recorded_dtype}"
            if outcome.dtype != outcome.recorded_dtype
            else ""
        )
        if outcome.error:
            click.echo(f"failed    {name}: {outcome.error}")
            code = 1
        elif verify:
            verdict = "identical" if outcome.matches else "DIFFERS "
            click.echo(
                f"{verdict} {name} {outcome.path} sha256 {str(outcome.sha256)[:16]} "
                f"(recorded {str(outcome.recorded_sha256)[:16]}{other})"
            )
            code = code or (0 if outcome.matches else 1)
        else:
            click.echo(f"wrote     {name} {outcome.path}{other}")
    click.echo(cost_line(outcomes, seconds))
    return code
