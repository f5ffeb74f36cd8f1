"""Allowed values of the imageInference request for FLUX.2 [klein], as data.

Source: the Runware model page for runware:400@6 (shared/spec/000_b07fdd4e16f4303e.txt) for ranges,
and Runware/runware-python v1.4.0 `runware/types/task_map.py` for the enumerations the page only
counts (shared/spec/runware-klein-9b-kv-values.md). Keep this file data only.
"""

from __future__ import annotations

SEED_MAX = 2**63 - 1  # the page prints 9223372036854776000, a float rendering of 2^63
SIDE_MIN, SIDE_MAX, SIDE_STEP = 128, 2048, 16
MAX_REFERENCES = 4

OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
OUTPUT_FORMATS = ("JPG", "PNG", "WEBP")
OUTPUT_EXTENSIONS = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}
DELIVERY_METHODS = ("sync", "async")
ACCELERATIONS = ("none", "low", "medium", "high")
LORA_TRANSFORMERS = ("high", "low", "both")

# Curated AIR ids of the klein family; used only when no model card is available.
DISTILLED_AIRS = {"runware:400@2": True, "runware:400@3": False, "runware:400@4": True, "runware:400@5": False, "runware:400@6": True}

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
