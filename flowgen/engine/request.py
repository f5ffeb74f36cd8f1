"""Checking a `Pipeline.generate` call before any work: one-line errors naming the argument."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flowgen.engine.errors import EngineInputError
from flowgen.engine.references.images import MAX_REFERENCES
from flowgen.errors import ImageInputError

PIXELS_PER_TOKEN = 16  # VAE x8, then 2x2 patchify
MAX_SIDE = 4096
MAX_STEPS = 1000
SEED_MAX = 2**64 - 1


@dataclass
class Request:
    prompts: list[str]
    references: list[list]  # one (possibly empty) list per prompt
    width: int | None
    height: int | None
    steps: int
    seeds: list[int] | None
    latents: np.ndarray | None
    guidance: float | None  # None: no CFG
    negative_prompts: list[str]


def check_request(
    prompts,
    references,
    width,
    height,
    steps,
    seeds,
    latents,
    guidance,
    negative_prompts,
    *,
    distilled: bool,
    default_steps: int,
    default_guidance: float | None,
) -> Request:
    """Validate and normalise the arguments of `Pipeline.generate` (see its docstring)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise EngineInputError("prompts: give a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise EngineInputError("prompts: every prompt must be a string")
    batch = len(prompts)
    refs = _references(references, batch)
    for name, side in (("width", width), ("height", height)):
        if side is not None and (
            not isinstance(side, (int, np.integer))
            or side < PIXELS_PER_TOKEN
            or side > MAX_SIDE
            or side % PIXELS_PER_TOKEN
        ):
            raise EngineInputError(
                f"{name}: {side!r} is not allowed; use a multiple of {PIXELS_PER_TOKEN} "
                f"between {PIXELS_PER_TOKEN} and {MAX_SIDE}"
            )
    steps = default_steps if steps is None else steps
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise EngineInputError(f"steps: {steps!r} is not allowed; use an integer from 1 to {MAX_STEPS}")
    if (seeds is None) == (latents is None):
        raise EngineInputError("give exactly one of seeds (one per prompt) or latents")
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != batch:
            raise EngineInputError(f"seeds: {len(seeds)} given for {batch} prompts; give one per prompt")
        if not all(isinstance(s, (int, np.integer)) and 0 <= s <= SEED_MAX for s in seeds):
            raise EngineInputError(f"seeds: every seed must be an integer from 0 to {SEED_MAX}")
        seeds = [int(s) for s in seeds]
    if latents is not None:
        latents = np.asarray(latents)
        if latents.ndim != 4 or latents.shape[0] != batch:
            raise EngineInputError(f"latents: expected (B={batch}, C, H/16, W/16); got {latents.shape}")
    negatives = [""] * batch if negative_prompts is None else list(negative_prompts)
    if len(negatives) != batch or not all(isinstance(p, str) for p in negatives):
        raise EngineInputError(f"negative_prompts: give one string per prompt ({batch})")
    return Request(
        list(prompts),
        refs,
        width and int(width),
        height and int(height),
        int(steps),
        seeds,
        latents,
        _guidance(guidance, distilled, default_guidance),
        negatives,
    )


def _references(references, batch: int) -> list[list]:
    if references is None:
        return [[] for _ in range(batch)]
    if isinstance(references, (str, bytes)) or not isinstance(references, Sequence) or len(references) != batch:
        raise ImageInputError(f"references: give one list of images per prompt ({batch}), or None")
    out = []
    for index, images in enumerate(references):
        images = [] if images is None else images
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise ImageInputError(f"references[{index}]: expected a list of images")
        if len(images) > MAX_REFERENCES:
            raise ImageInputError(
                f"references[{index}]: {len(images)} images given; at most {MAX_REFERENCES} are allowed"
            )
        out.append(list(images))
    return out


def _guidance(guidance, distilled: bool, default: float | None) -> float | None:
    """The CFG weight to use, or None for a single conditional pass.

    Distilled models ignore guidance (as diffusers does); base models use CFG when w > 1.
    """
    if guidance is not None and (not isinstance(guidance, (int, float)) or not np.isfinite(guidance) or guidance < 0):
        raise EngineInputError(f"guidance: {guidance!r} is not allowed; use a number >= 0")
    if distilled:
        return None
    guidance = default if guidance is None else float(guidance)
    return guidance if guidance is not None and guidance > 1.0 else None
