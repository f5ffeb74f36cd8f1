"""Manifest records and embedded metadata, built from planned results.

A record is a plain JSON dict (schema `MANIFEST_SCHEMA`) that holds everything needed to explain
and regenerate one image: identity, seed, every resolved parameter, reference paths + content
hashes, output path + sha256, batch size/position, timings, model, dtype and engine identity,
status. Its webhookURL / uploadEndpoint are recorded redacted (flowgen.net.redact): the URLs as
given live only in the run folder's unexported sink-urls file (flowgen.run.deliver).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from flowgen.delivery.payload import uuid_from_key
from flowgen.net.redact import redacted_task, redacted_values
from flowgen.plan.diff import relative_output
from flowgen.plan.hashing import image_params
from flowgen.plan.model import Plan, PlannedResult
from flowgen.run.manifest import SCHEMA_VERSION


def jsonable(value: Any) -> Any:
    """Paths and other odd values become strings, so records always serialise."""
    return json.loads(json.dumps(value, default=str))


def result_record(
    plan: Plan,
    result: PlannedResult,
    *,
    status: str,
    run_id: str,
    error: str | None = None,
    output_sha256: str | None = None,
    output_bytes: int | None = None,
    timings: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
    batch: dict[str, Any] | None = None,
    cost: float | None = None,
    safety: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest record of one result (see module doc)."""
    item = result.item
    task = item.task
    return {
        "schema": SCHEMA_VERSION,
        "taskType": "imageInference",
        # the recipe's taskUUID, else one derived from the item: the same on every rerun
        "taskUUID": item.delivery.task_uuid or uuid_from_key(f"task:{item.item_id}"),
        "imageUUID": _image_uuid(result.content_hash, output_sha256) if output_sha256 else None,
        "item_id": item.item_id,
        "item_key": item.key,
        "result_index": result.result_index,
        "status": status,
        "error": error,
        "seed": result.seed,
        "content_hash": result.content_hash,
        "params": jsonable(redacted_task(task)),  # no presigned signature, no webhook secret
        "values": jsonable(redacted_values(item.values, task)),  # a dataset column may hold presigned URLs
        "references": [
            {"path": path, "sha256": digest, "width": size[0], "height": size[1]}
            for path, digest, size in zip(item.references, item.reference_hashes, item.reference_sizes)
        ],
        "output": {
            "path": relative_output(plan, result),
            "sha256": output_sha256,
            "bytes": output_bytes,
            "format": result.job.output_format,
        },
        "batch": batch,
        "outputType": item.delivery.output_type,
        **({"cost": cost} if cost is not None else {}),
        **({"safety": safety, "NSFWContent": safety["NSFWContent"]} if safety is not None else {}),
        "timings": timings or {},
        "model": {"name": plan.model, "identity": jsonable(plan.model_identity)},
        "dtype": plan.dtype,  # the compute dtype: part of the content hash, and what regen renders in
        "engine": engine,
        "recipe": {"name": plan.recipe_name, "hash": plan.recipe_hash},
        "plan_hash": plan.plan_hash,
        "run_id": run_id,
        "updated_at": time.time(),
    }


def embedded_metadata(plan: Plan, result: PlannedResult) -> dict[str, Any]:
    """What goes inside the image file for a planned result (see metadata_for)."""
    item = result.item
    return metadata_for(
        item.item_id,
        item.key,
        result.result_index,
        result.seed,
        result.content_hash,
        plan.model,
        plan.recipe_name,
        item.task,
        item.reference_hashes,
    )


def metadata_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """The same metadata, rebuilt from a manifest record (for regen)."""
    return metadata_for(
        record["item_id"],
        record["item_key"],
        record["result_index"],
        record["seed"],
        record["content_hash"],
        record["model"]["name"],
        record["recipe"]["name"],
        record["params"],
        [r["sha256"] for r in record["references"]],
    )


def metadata_for(
    item_id, item_key, result_index, seed, content_hash, model, recipe, task, reference_hashes
) -> dict[str, Any]:
    """A pointer to the manifest row plus the parameters. Deterministic (no times, no run ids),
    so a regenerated file is byte-identical."""
    return {
        "flowgen": SCHEMA_VERSION,
        "item_id": item_id,
        "item_key": item_key,
        "result_index": result_index,
        "seed": seed,
        "content_hash": content_hash,
        "model": model,
        "recipe": recipe,
        "params": jsonable({**image_params(task), "seed": seed}),
        "references": list(reference_hashes),
        "manifest": ".flowgen/manifest.sqlite",
    }


def _image_uuid(content_hash: str, output_sha256: str) -> str:
    """A v4-shaped UUID derived from the result (stable across identical re-renders)."""
    raw = bytearray(bytes.fromhex(content_hash)[:8] + bytes.fromhex(output_sha256)[:8])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))
