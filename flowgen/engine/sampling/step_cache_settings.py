"""Step-cache settings: the task's `acceleration` preset and `acceleratorOptions` -> one `StepCache`.

JAX-free (the recipe layer and the plan read it). `resolve(...)` returns None when nothing may be
skipped: then the sampling loop is exactly the uncached one.

    cache = resolve("high", {"fbCache": True, "fbCacheThreshold": 0.1}, steps=28, distilled=False)
    cache.kind, cache.threshold, cache.start, cache.end      # "fbcache", 0.1, 0, 28

Three algorithms (docs/recipes.md, "Step caches"), one state machine (`sampling/step_cache.py`):

* teacache — distance = polynomial-rescaled relative L1 change of block 0's modulated input since
  the previous step, accumulated; skip while the sum stays below `threshold`, reset on every
  computed step; the first and last steps are always computed (ali-vilab/TeaCache).
* fbcache — distance = relative L1 change of the first block's residual against the last computed
  step (the anchor moves on computed steps only); skip iff below `threshold` (ParaAttention).
* dbcache — the same test on the residual of the first `front` blocks; skipped steps still run the
  last `back` blocks on the cached middle residual; `refresh` forces a computed step every
  `refresh` steps of the window (cache-dit's DBCache, F`front`B`back`).

Common limits: steps outside [start, end) are computed; after `max_consecutive` cached steps one
is computed; step 0 is always computed (nothing is cached yet).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowgen.engine.errors import EngineInputError

KINDS = ("teacache", "fbcache", "dbcache")
ACCELERATIONS = ("none", "low", "medium", "high")
DEFAULT_ACCELERATION = "high"

# FLUX.1-dev's published TeaCache rescale polynomial (TeaCache4FLUX, numpy.poly1d order: highest
# power first). No FLUX.2 [klein] fit is published; `bench/teacache_calibrate.py` fits one from a
# model's own trajectories. Kept as the default for real Klein weights: it was fitted on a real
# flow-matching DiT of the same family, which a fit on random weights is not.
FLUX1_TEACACHE_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)

# Spec defaults (acceleratorOptions)
DEFAULTS = {
    "teaCacheDistance": 0.5,
    "fbCacheThreshold": 0.25,
    "dbCacheThreshold": 0.25,
    "dbCacheSkipInterval": 5,
    "cacheMaxConsecutiveSteps": 3,
}
# DBCache's always-computed blocks (the spec has no knob for them): one in front (the signal), one
# behind (cache-dit's "auto-scaler" that corrects the reused middle residual).
DBCACHE_FRONT, DBCACHE_BACK = 1, 1

# Presets for schedules long enough to cache (base models, 28-50 steps): first-block cache with a
# growing threshold and consecutive-skip cap; the first 10% of steps are always computed (the layout
# of the image is decided there). Measured effect: bench/RESULTS.md, "Step caches".
PRESET_MIN_STEPS = 8  # at <= this many steps presets skip nothing (distilled models run 4)
_FB = {"fbCache": True, "cacheStartStepPercentage": 10}
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "low": {**_FB, "fbCacheThreshold": 0.05, "cacheMaxConsecutiveSteps": 1},
    "medium": {**_FB, "fbCacheThreshold": 0.08, "cacheMaxConsecutiveSteps": 2},
    "high": {**_FB, "fbCacheThreshold": 0.12, "cacheMaxConsecutiveSteps": 3},
}


@dataclass(frozen=True)
class StepCache:
    """One resolved step cache (hashable: a static argument of the compiled loop)."""

    kind: str  # one of KINDS
    threshold: float
    start: int  # first step index (0-based) that may be cached
    end: int  # steps >= end are computed
    max_consecutive: int = 3
    front: int = 0  # blocks always run before the decision (teacache 0, fbcache 1, dbcache DBCACHE_FRONT)
    back: int = 0  # blocks always run after the cached middle (dbcache only)
    refresh: int = 0  # dbcache: a computed step every `refresh` window steps (0: off)
    coefficients: tuple[float, ...] = FLUX1_TEACACHE_COEFFICIENTS  # teacache rescale, highest power first
    # replay: the computed/skipped sequence of a recorded loop ("1" computed, "0" skipped) taken
    # instead of deciding; a decision depends on the batch mates, so regen replays it
    replay: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "threshold": self.threshold,
            "start": self.start,
            "end": self.end,
            "max_consecutive": self.max_consecutive,
        }
        if self.kind == "dbcache":
            out.update(front=self.front, back=self.back, refresh=self.refresh)
        return out


def _enabled(options: Mapping[str, Any]) -> list[str]:
    return [kind for kind, field in zip(KINDS, ("teaCache", "fbCache", "dbCache")) if options.get(field)]


def option_problems(options: Mapping[str, Any] | None) -> list[str]:
    """Rules beyond each field's range (which the spec validation checks): one message each,
    naming the field relative to acceleratorOptions."""
    options = options or {}
    enabled = _enabled(options)
    if len(enabled) > 1:
        return [
            "teaCache, fbCache and dbCache are alternatives; enable one of them, got "
            + ", ".join(f for f in ("teaCache", "fbCache", "dbCache") if options.get(f))
        ]
    return []


def resolve(
    acceleration: str | None,
    options: Mapping[str, Any] | None,
    *,
    steps: int,
    distilled: bool,
    coefficients: tuple[float, ...] | None = None,
) -> StepCache | None:
    """The step cache for one sampling loop, or None (nothing is skipped: the uncached loop).

    Explicit acceleratorOptions (teaCache / fbCache / dbCache) win over the preset; the window and
    limit options (cacheStartStep, ...) apply to whichever cache runs. Presets skip nothing at
    <= PRESET_MIN_STEPS steps: a 4-step distilled schedule always computes its first step, every
    skip then reuses a residual from a step that moved the image a quarter of the way."""
    acceleration = acceleration or DEFAULT_ACCELERATION
    if acceleration not in PRESETS:
        raise EngineInputError(f"acceleration: {acceleration!r} is not allowed; use one of {', '.join(ACCELERATIONS)}")
    options = dict(options or {})
    problems = option_problems(options)
    if problems:
        raise EngineInputError(f"acceleratorOptions: {problems[0]}")
    if not _enabled(options):
        if distilled or steps <= PRESET_MIN_STEPS or not PRESETS[acceleration]:
            return None
        options = {**PRESETS[acceleration], **{k: v for k, v in options.items() if k.startswith("cache")}}

    def get(name: str) -> Any:
        return options.get(name) if options.get(name) is not None else DEFAULTS.get(name)

    kind = _enabled(options)[0]
    start, end = window(options, steps)
    common: dict[str, Any] = dict(start=start, end=end, max_consecutive=int(get("cacheMaxConsecutiveSteps")))
    if kind == "teacache":
        return StepCache(
            "teacache",
            float(get("teaCacheDistance")),
            **common,
            coefficients=tuple(coefficients or FLUX1_TEACACHE_COEFFICIENTS),
        )
    if kind == "fbcache":
        return StepCache("fbcache", float(get("fbCacheThreshold")), **common, front=1)
    return StepCache(
        "dbcache",
        float(get("dbCacheThreshold")),
        **common,
        front=DBCACHE_FRONT,
        back=DBCACHE_BACK,
        refresh=int(get("dbCacheSkipInterval")) + 1,
    )


def window(options: Mapping[str, Any], steps: int) -> tuple[int, int]:
    """(start, end) step indices of the caching window: absolute steps win over percentages;
    start = floor(steps·pct/100), end = ceil(steps·pct/100); default the whole schedule."""
    start, end = options.get("cacheStartStep"), options.get("cacheEndStep")
    if start is None and options.get("cacheStartStepPercentage") is not None:
        start = math.floor(steps * options["cacheStartStepPercentage"] / 100)
    if end is None and options.get("cacheEndStepPercentage") is not None:
        end = math.ceil(steps * options["cacheEndStepPercentage"] / 100)
    start = 0 if start is None else int(start)
    end = steps if end is None else min(int(end), steps)
    if not start < end:
        raise EngineInputError(
            f"acceleratorOptions: the caching window [{start}, {end}) of {steps} steps is empty; "
            "cacheEndStep must be greater than cacheStartStep"
        )
    return start, end
