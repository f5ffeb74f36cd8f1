"""How a run's batches are rendered: here, one by one (render_locally), or elsewhere (a Ray actor
pool, flowgen.run.ray_runner). Either way the executor records what comes back, batch by batch, in
the batches' order, so the manifest has one writer and the progress one place."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

from flowgen.plan.model import Batch

# for each batch in order: (records, finished results); a generator, so the executor can close it early
Rendered = Generator[tuple[list[dict], list], None, None]
# (the executor's batch runner, the batches) -> Rendered
BatchRendering = Callable[[Any, Sequence[Batch]], Rendered]


def render_locally(runner, batches: Sequence[Batch]) -> Rendered:
    """Each batch with this process's engine, when the executor asks for it (after its checks)."""
    return (runner.run(batch) for batch in batches)
