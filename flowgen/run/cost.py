"""What a result costs: measured engine seconds × a rate, and a budget that stops a run in time.

The rate is USD per engine-second, `$FLOWGEN_COST_PER_DEVICE_SECOND`, default 0.0007 (one H100 at
about $2.50 an hour). Engine seconds are the wall time of the batch's engine call divided by the
batch size: device time plus the host work the engine does around it (prompt encoding, reference
preparation), which is what a machine rented for the run pays for.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable

from flowgen.errors import FlowgenError

RATE_ENV = "FLOWGEN_COST_PER_DEVICE_SECOND"
DEFAULT_RATE = 0.0007


def rate() -> float:
    text = os.environ.get(RATE_ENV, "").strip()
    if not text:
        return DEFAULT_RATE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise FlowgenError(f"{RATE_ENV}={text!r} is not allowed: use a number of USD per engine-second ≥ 0")
    return value


def cost_of(engine_seconds: float, per_second: float | None = None) -> float:
    """The cost in USD of `engine_seconds`, rounded to a millionth of a dollar."""
    return round(engine_seconds * (rate() if per_second is None else per_second), 6)


def seconds_per_image(records: Iterable[dict], signature: str) -> float | None:
    """The median engine seconds per image of earlier ok results with this batch signature."""
    seen = [
        r["timings"]["engine_per_image"]
        for r in records
        if r.get("status") == "ok"
        and (r.get("batch") or {}).get("signature") == signature
        and "engine_per_image" in (r.get("timings") or {})
    ]
    return statistics.median(seen) if seen else None


class Budget:
    """Spending so far against an optional limit: `allows(n)` before each batch of n images."""

    def __init__(self, limit: float | None, per_second: float | None = None):
        if limit is not None and not limit > 0:
            raise FlowgenError(f"--budget {limit} is not allowed: use an amount in USD > 0")
        self.limit, self.per_second = limit, rate() if per_second is None else per_second
        self.spent = 0.0
        self.last_per_image: float | None = None  # engine seconds per image of the last batch

    def allows(self, images: int, history_per_image: float | None = None) -> bool:
        """Whether a batch of `images` fits: estimated from the last batch (or earlier runs); the
        first batch with no estimate at all always runs, as nothing else can say what it costs."""
        if self.limit is None:
            return True
        per_image = self.last_per_image or history_per_image
        estimate = 0.0 if per_image is None else per_image * images * self.per_second
        return self.spent + estimate <= self.limit

    def spend(self, engine_seconds: float, images: int) -> None:
        self.spent += engine_seconds * self.per_second
        self.last_per_image = engine_seconds / max(images, 1)
