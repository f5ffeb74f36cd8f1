"""What the local engine executes, accepts as a record only, or refuses (for now).

Every field is first validated against the API spec (task_model.py); this table then decides what
flowgen does with a valid value. Refusing beats silently ignoring: a recipe that asks for a
webhook or a LoRA must not "succeed" without one. docs/recipes.md mirrors this table.
"""

from __future__ import annotations

import re
from typing import Any

from flowgen.engine.sampling import names as scheduler_names  # JAX-free: the spec names -> samplers

NOT_YET = "not supported yet by the local engine"

# Schedulers: every spec name the engine runs is in scheduler_names.SUPPORTED; the few it refuses are
# scheduler_names.REFUSED (name -> why). Names outside the spec are the spec validation's to report.
ENGINE_ACCELERATION = "high"  # the spec default; the engine's exact reference-KV cache is always on

_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def support_problems(task: dict[str, Any], where: str) -> list[str]:
    """Problems for valid-per-spec values that the local engine cannot honour yet."""
    problems = []

    def refuse(field: str, why: str) -> None:
        problems.append(f"{where}.{field}: {NOT_YET} ({why}); remove it")

    if task.get("webhookURL") is not None:
        refuse("webhookURL", "results are written to the output folder and manifest")
    if task.get("uploadEndpoint") is not None:
        refuse("uploadEndpoint", "results are written to the output folder")
    if task.get("deliveryMethod") == "async":
        refuse("deliveryMethod", "only 'sync' is available")
    if isinstance(task.get("safety"), dict) and task["safety"].get("checkContent") in (True, "true"):
        refuse("safety.checkContent", "there is no local content checker; only false is accepted")
    if task.get("acceleration") not in (None, ENGINE_ACCELERATION):
        refuse("acceleration", f"only {ENGINE_ACCELERATION!r}, the default: the exact reference KV cache is always on")
    if task.get("acceleratorOptions") is not None:
        refuse("acceleratorOptions", "no step caching besides the exact reference KV cache")
    if task.get("lora") is not None:
        refuse("lora", "LoRA adapters are not loaded")
    if task.get("ultralytics") is not None:
        refuse("ultralytics", "no face refinement pass")
    scheduler = task.get("scheduler")
    if isinstance(scheduler, str) and scheduler in scheduler_names.REFUSED:
        refuse("scheduler", scheduler_names.REFUSED[scheduler])
    references = (task.get("inputs") or {}).get("referenceImages") if isinstance(task.get("inputs"), dict) else None
    for index, ref in enumerate(references or []):
        if isinstance(ref, str) and _is_remote(ref):
            refuse(f"inputs.referenceImages[{index}]", "reference images must be local files, not URLs, data URIs or UUIDs")
    return problems


def _is_remote(ref: str) -> bool:
    return ref.startswith(("http://", "https://", "data:")) or bool(_UUID.match(ref))
