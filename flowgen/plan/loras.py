"""A task's `lora` list -> the LoRA files it means, with their content hashes (for jobs and hashes).

    resolve = LoraResolver()
    resolve(task, "item key")   # ((path, sha256, weight), ...); () without LoRAs

Names are resolved by flowgen.engine.lora.source (a path, a name in $FLOWGEN_LORA_DIR, or an
AIR-like id); each distinct list is resolved, its files' tensor names checked and their bytes
hashed once per plan. A missing file, or one that is not a LoRA flowgen reads, is a RecipeError
naming the field, the item and the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowgen.engine import EngineInputError, checked_lora_path
from flowgen.errors import RecipeError
from flowgen.plan.hashing import FileHashCache

DEFAULT_WEIGHT = 1.0  # the spec's default for lora[].weight


class LoraResolver:
    def __init__(self, file_hash: FileHashCache | None = None):
        self._file_hash = file_hash or FileHashCache()
        self._resolved: dict[tuple, tuple] = {}

    def __call__(self, task: Mapping[str, Any], item_key: str = "") -> tuple[tuple[str, str, float], ...]:
        entries = task.get("lora")
        if not entries:
            return ()
        key = tuple((entry.get("model"), entry.get("weight")) for entry in entries)
        if key not in self._resolved:
            self._resolved[key] = tuple(
                self._one(index, model, weight, item_key) for index, (model, weight) in enumerate(key)
            )
        return self._resolved[key]

    def _one(self, index: int, model: Any, weight: Any, item_key: str) -> tuple[str, str, float]:
        where = f"task.lora[{index}].model" + (f" (item {item_key!r})" if item_key else "")
        try:
            path = checked_lora_path(str(model), where)
        except EngineInputError as err:  # the engine's refusal, as the recipe field it came from
            raise RecipeError(str(err)) from None
        try:
            digest = self._file_hash(path)
        except OSError as err:
            raise RecipeError(f"{where}: cannot read {path} ({err.strerror or err})") from None
        return (str(path), digest, DEFAULT_WEIGHT if weight is None else float(weight))
