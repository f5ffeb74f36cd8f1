"""Content hashes: what a result's image depends on, reduced to one sha256.

A result's hash covers the model identity (the card's: never its weight files), the dtype (unless float32),
every resolved task parameter that can change the file's bytes, the reference images' and LoRA
files' *content* (sha256 of file bytes, so moving a file changes nothing; editing one re-renders),
the seed and the result index.
Delivery-only fields (webhooks, upload targets, taskUUID, ...) are left out: changing them must not
re-render anything. numberResults is left out too, so raising it from 2 to 3 only adds result 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HASH_SCHEMA = 1  # bump when the hashed material changes shape: every result then re-renders
# Every result was float32 before the dtype became a setting: that dtype is left out of the hash (and
# is what a record without a dtype was rendered in), so those results stay up to date.
BASE_DTYPE = "float32"

# Fields that never change an output file's bytes.
NON_IMAGE_FIELDS = frozenset(
    {
        "taskType",
        "taskUUID",
        "webhookURL",
        "deliveryMethod",
        "uploadEndpoint",
        "includeCost",
        "ttl",
        "outputType",
        "numberResults",
        "seed",  # hashed as the per-result seed instead
        "referenceImages",  # hashed by content instead of by path
        "inputs",  # likewise (its other fields, if any, are kept: see image_params)
        "lora",  # hashed as (file content, weight) pairs instead (see lora_material)
        "safety",
    }
)


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def canonical_json(value: Any) -> str:
    """Deterministic compact JSON (sorted keys, no spaces, ASCII) used for every hash."""
    return _ENCODER.encode(value)


def image_params(task: Mapping[str, Any]) -> dict[str, Any]:
    """The task fields that can change the output bytes (see NON_IMAGE_FIELDS)."""
    params = {k: v for k, v in task.items() if k not in NON_IMAGE_FIELDS}
    other_inputs = {k: v for k, v in (task.get("inputs") or {}).items() if k != "referenceImages"}
    if other_inputs:
        params["inputs"] = other_inputs
    return params


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FileHashCache:
    """sha256 of files, remembered per (path, size, mtime) so shared references are read once.

    hash_file: how a file is hashed (references pass flowgen.engine.references.files.reference_sha256,
    which refuses a FIFO or a device instead of reading it forever)."""

    def __init__(self, hash_file: Callable[[str], str] = sha256_file) -> None:
        self._hash_file = hash_file
        self._cache: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: str | os.PathLike) -> str:
        stat = os.stat(path)  # never blocks, whatever the path is
        key = (str(Path(path)), stat.st_size, stat.st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = self._hash_file(key[0])
        return self._cache[key]


def model_key(model_identity: Mapping[str, Any], dtype: str = BASE_DTYPE) -> str:
    """The model identity and compute dtype as hashed (serialised once per plan, not once per item)."""
    key = canonical_json(model_identity)
    return key if dtype == BASE_DTYPE else f"{key}\0dtype={dtype}"  # canonical JSON never holds a raw NUL


def lora_material(lora_set) -> str:
    """The LoRA part of an item hash: '' without LoRAs (so those hashes stay as they were), else
    the ((sha256, weight), ...) set in the task's order."""
    return f"\0lora={canonical_json([[digest, weight] for digest, weight in lora_set])}" if lora_set else ""


def item_hash(model: str, task: Mapping[str, Any], reference_hashes: list[str], lora_set=()) -> str:
    """Hash of everything an item's results share: model (see model_key), parameters, reference
    contents, LoRA contents and weights, and the hash schema."""
    material = (
        f"flowgen-item-hash/{HASH_SCHEMA}\0{model}\0{canonical_json(image_params(task))}\0{','.join(reference_hashes)}"
    )
    return hashlib.sha256((material + lora_material(lora_set)).encode()).hexdigest()


def result_hash(item_digest: str, seed: int, result_index: int) -> str:
    """Hash of one result: its item's hash plus its own seed and index."""
    return hashlib.sha256(f"{item_digest}\0{seed}\0{result_index}".encode()).hexdigest()


class ItemHasher:
    """item_hash for the many items of one plan, faster and with the same digests: the model part
    is hashed once, and the parameters' JSON reuses the encoding of values that repeat."""

    def __init__(self, model: str):
        from flowgen.plan.params_json import ParamsJson  # it builds on this module

        self._prefix = hashlib.sha256(f"flowgen-item-hash/{HASH_SCHEMA}\0{model}\0".encode())
        self._params_json = ParamsJson()

    def __call__(self, task: Mapping[str, Any], reference_hashes: list[str] | tuple[str, ...], lora_set=()) -> str:
        digest = self._prefix.copy()
        digest.update(f"{self._params_json(task)}\0{','.join(reference_hashes)}{lora_material(lora_set)}".encode())
        return digest.hexdigest()
