"""What the local engine supports, as data: the recipe layer's support table reads it.

    caps = capabilities()
    caps.lora                        # True: LoRA adapters are merged per batch
    caps.refused_schedulers["..."]   # why a spec scheduler name is refused
    caps.why_not["lora"]             # the one-line reason a refusal names

JAX-free (and cheap): `flowgen validate` and `flowgen plan` read it without loading the engine.
When the engine learns a feature, it changes here, and `validate` stops refusing it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Where a reference image may come from (inputs.referenceImages entries).
REFERENCE_KINDS = ("file", "url", "data_uri", "uuid")


@dataclass(frozen=True)
class Capabilities:
    """The local engine's abilities. Features off today say why in `why_not` (one line each)."""

    schedulers: tuple[str, ...]  # spec scheduler names the engine runs
    refused_schedulers: Mapping[str, str]  # spec names it refuses -> why
    acceleration: tuple[str, ...]  # `acceleration` values honoured
    lora: bool  # LoRA adapters
    accelerator_options: bool  # step caching (acceleratorOptions)
    ultralytics: bool  # the face refinement pass
    max_references: int  # reference images per item
    max_reference_pixels: int  # largest reference image decoded
    reference_inputs: tuple[str, ...]  # which REFERENCE_KINDS a reference may be
    dtypes: tuple[str, ...]  # compute dtypes (--dtype / FLOWGEN_DTYPE)
    why_not: Mapping[str, str]  # feature (a task field name) -> why it is not supported / limited


@functools.cache
def capabilities() -> Capabilities:
    """The capabilities of this flowgen's engine (the same object on every call)."""
    from flowgen.engine.references.images import MAX_DECODE_PIXELS, MAX_REFERENCES
    from flowgen.engine.runtime import DTYPES
    from flowgen.engine.sampling import names
    from flowgen.engine.sampling.step_cache_settings import ACCELERATIONS

    acceleration = ACCELERATIONS  # presets of step caches (step_cache_settings.PRESETS)
    return Capabilities(
        schedulers=names.SUPPORTED,
        refused_schedulers=MappingProxyType(dict(names.REFUSED)),
        acceleration=acceleration,
        lora=True,
        accelerator_options=True,
        ultralytics=True,
        max_references=MAX_REFERENCES,
        max_reference_pixels=MAX_DECODE_PIXELS,
        reference_inputs=("file",),
        dtypes=DTYPES,
        why_not=MappingProxyType(
            {
                "acceleration": f"only {', '.join(map(repr, acceleration))}",
                "acceleratorOptions": "step caches (teaCache, fbCache, dbCache) run in the compiled sampling loop",
                "lora": (
                    "LoRA adapters (ai-toolkit/BFL, kohya, diffusers/PEFT, LoKr) are merged into the weights per batch"
                ),
                "ultralytics": "faces found by NudeNet (or a YOLOv8 .onnx) are refined by Klein img2img",
                "inputs.referenceImages": "reference images must be local files, not URLs, data URIs or UUIDs",
            }
        ),
    )
