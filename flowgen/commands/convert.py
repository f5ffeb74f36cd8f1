"""`flowgen convert WEIGHTS OUT`: released transformer weights -> the engine's own Orbax checkpoint."""

from __future__ import annotations

import time

import click


def convert_command(weights: str, out: str, dtype: str | None = None) -> int:
    """Convert WEIGHTS (a diffusers pipeline or transformer folder, or a BFL single file) into OUT
    (flowgen.engine.convert_weights); prints what was written and how to use it. Returns 0; bad
    input raises a one-line CheckpointError (exit 2) and leaves OUT absent."""
    from flowgen.engine import convert_weights

    started = time.perf_counter()
    written = convert_weights(weights, out, dtype)
    seconds = time.perf_counter() - started
    what = (
        "a pipeline folder (its transformer converted; the other components linked)"
        if written["pipeline"]
        else ("a converted transformer folder")
    )
    click.echo(
        f"wrote {written['out']}: {what}, {written['parameters']:,} parameters in {written['dtype']}, "
        f"from {written['source']} ({written['source_layout']} layout) in {seconds:.1f} s"
    )
    use = f"model: {written['out']}" if written["pipeline"] else f"a card's weights.transformer_file: {written['out']}"
    click.echo(f"use it as `{use}` (it loads straight into the device mesh's layout)")
    return 0
