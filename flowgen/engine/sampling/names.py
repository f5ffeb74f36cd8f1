"""The spec's scheduler names -> (sampler, sigma schedule). JAX-free: the recipe layer reads it.

    choice = resolve("Default")               # SchedulerChoice, or SchedulerRefused (one-line message)
    choice.sampler()                          # a sampling.base.Sampler (imports JAX)
    choice.sigmas(steps, image_seq_len)       # (steps + 1,) float32, ending in 0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT = "Default"


class SchedulerRefused(ValueError):
    """A scheduler name the engine does not run; the message is one line naming what is supported."""


@dataclass(frozen=True)
class SchedulerChoice:
    name: str  # the spec name as given
    sampler_name: str  # e.g. "euler"
    schedule_name: str  # e.g. "default" (Klein's shifted schedule)

    def sampler(self):
        from flowgen.engine.sampling.base import FlowEuler

        return FlowEuler()

    def sigmas(self, steps: int, image_seq_len: int) -> np.ndarray:
        from flowgen.engine.sampling import flow_schedule

        return flow_schedule.sigmas(steps, image_seq_len)


_TABLE = {
    "Default": ("euler", "default"),
    "FlowMatchEulerDiscreteScheduler": ("euler", "default"),
}
SUPPORTED = tuple(_TABLE)


def resolve(name: str | None) -> SchedulerChoice:
    name = DEFAULT if name is None else name
    if name not in _TABLE:
        raise SchedulerRefused(f"scheduler {name!r} is not supported; use one of {', '.join(SUPPORTED)}")
    return SchedulerChoice(name, *_TABLE[name])
