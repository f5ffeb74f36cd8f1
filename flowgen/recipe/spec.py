"""The imageInference spec's values and limits for FLUX.2 [klein], as data: the one place for them.

Sources: the Runware model page for runware:400@6 (shared/spec/000_b07fdd4e16f4303e.txt) for ranges
and defaults, and Runware/runware-python v1.4.0 `runware/types/task_map.py` for the enumerations the
page only counts (shared/spec/runware-klein-9b-kv-values.md). The limits on a reference image's
pixels are not on the page: they are what the local engine accepts (see the comment on them).

Everything the recipe layer checks twice, or that the planner also needs, is defined here; the
ranges of the other request fields are written once, field by field as on the page, on TaskFields
in schema.py. Keep this file data only (no imports): flowgen.plan reads it too.
"""

from __future__ import annotations

# The page prints max 9223372036854776000, a float rendering of 2^63: the range is the signed 64-bit
# one, 0 .. 2^63-1 (not 2^64-1).
SEED_MAX = 2**63 - 1
SIDE_MIN, SIDE_MAX, SIDE_STEP = 128, 2048, 16
MAX_REFERENCES = 4  # inputs.referenceImages: min items 1, max items 4

# One reference image (flowgen's own checks, not the page's): each side >= 64 px and an aspect
# ratio <= 8, as diffusers' Klein pipelines require; at most 150 MP, the most the engine decodes
# (flowgen/engine/references/images.py MAX_DECODE_PIXELS), so `validate` accepts what `run` accepts.
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8
REFERENCE_MAX_PIXELS = 150_000_000

OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
OUTPUT_FORMATS = ("JPG", "PNG", "WEBP")
OUTPUT_EXTENSIONS = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}  # outputFormat -> file extension
DELIVERY_METHODS = ("sync", "async")
ACCELERATIONS = ("none", "low", "medium", "high")
LORA_TRANSFORMERS = ("high", "low", "both")

# The page's defaults of the fields the engine uses (outputFormat JPG, outputQuality 95, steps 4,
# numberResults 1); CFGScale's default 3.5 applies only where the model is known to use guidance.
SPEC_DEFAULTS = {"numberResults": 1, "outputFormat": "JPG", "outputQuality": 95, "steps": 4}
SPEC_CFG_DEFAULT = 3.5

# Curated AIR ids of the klein family; used only when no model card is available.
DISTILLED_AIRS = {
    "runware:400@2": True,
    "runware:400@3": False,
    "runware:400@4": True,
    "runware:400@5": False,
    "runware:400@6": True,
}

SCHEDULERS: tuple[str, ...] = (
    "DDIM",
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "Default",
    "DPM++",
    "DPM++ 2M",
    "DPM++ 2M Beta",
    "DPM++ 2M Exponential",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Beta",
    "DPM++ 2M SDE Exponential",
    "DPM++ 2M SDE Karras",
    "DPM++ 2M SDE Uniform",
    "DPM++ 2M Uniform",
    "DPM++ 3M",
    "DPM++ 3M Beta",
    "DPM++ 3M Exponential",
    "DPM++ 3M Karras",
    "DPM++ 3M SDE Uniform",
    "DPM++ 3M Uniform",
    "DPM++ Beta",
    "DPM++ Exponential",
    "DPM++ Karras",
    "DPM++ SDE",
    "DPM++ SDE Beta",
    "DPM++ SDE Exponential",
    "DPM++ SDE Karras",
    "DPM++ Uniform",
    "DPM++ Uniform Beta",
    "DPM++ Uniform Exponential",
    "DPM++ Uniform Karras",
    "DPMSolverMultistepInverse",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EDMDPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "Euler",
    "Euler a",
    "Euler Beta",
    "Euler Exponential",
    "Euler Karras",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "Heun",
    "HeunDiscreteScheduler",
    "Heun Karras",
    "IPNDMScheduler",
    "IPNDM Uniform",
    "IPNDM Uniform Beta",
    "IPNDM Uniform Exponential",
    "IPNDM Uniform Karras",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCM",
    "LCMScheduler",
    "LMS",
    "LMSDiscreteScheduler",
    "LMS Karras",
    "PNDMScheduler",
    "TCDScheduler",
    "UniPC",
    "UniPC 2M",
    "UniPC 2M Karras",
    "UniPC 2M Uniform",
    "UniPC 3M",
    "UniPC 3M Karras",
    "UniPC 3M Uniform",
    "UniPC Karras",
    "UniPC Uniform",
    "UniPC Uniform Beta",
    "UniPC Uniform Exponential",
    "UniPC Uniform Karras",
)
