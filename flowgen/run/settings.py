"""Run settings the commands read from their options and the environment (not the planner).

`--max-batch N`, else $FLOWGEN_MAX_BATCH, else DEFAULT_MAX_BATCH; the planner (plan_recipe) takes
the resolved value. The compute dtype's counterpart is flowgen.run.dtype.dtype_setting.
"""

from __future__ import annotations

import os

from flowgen.errors import FlowgenError
from flowgen.plan.from_recipe import DEFAULT_MAX_BATCH

__all__ = ["DEFAULT_MAX_BATCH", "max_batch_setting"]


def max_batch_setting(option: int | None = None) -> int:
    """The --max-batch value when given, else FLOWGEN_MAX_BATCH when set (a positive integer, else a
    one-line FlowgenError), else DEFAULT_MAX_BATCH."""
    if option:  # 0 / None: not given (the CLI refuses 0)
        return int(option)
    value = os.environ.get("FLOWGEN_MAX_BATCH", "").strip()
    if not value:
        return DEFAULT_MAX_BATCH
    if not value.isdigit() or int(value) < 1:
        raise FlowgenError(f"FLOWGEN_MAX_BATCH={value!r} is not allowed: use a positive integer such as 8 or 16")
    return int(value)
