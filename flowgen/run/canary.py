"""Golden-seed canary: before a run renders, re-render a few fixed results and compare them with
their first renders, so a drifted engine (a new JAX, driver, dtype, weights) is caught before it
writes hundreds of images.

The fixed items are the first N items of the plan, in plan order, the first time the canary runs;
their ids are kept in the manifest, so the same items are checked on every later run. Each one's
result 0 is replayed from its manifest record as regen replays it (same job, seed, batch size and
reference layout), in memory, encoded like the original file, and compared over decoded pixels
(PSNR). Identical bytes are infinite PSNR. An item without a usable first render (not rendered yet,
its file or a reference changed since) is not compared: the run renders it, and that render is what
later runs compare against. Every verdict is recorded in the manifest's `canary` table.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flowgen.engine import reference_sha256
from flowgen.plan.hashing import sha256_file
from flowgen.plan.model import Canary, Plan
from flowgen.run.engine import Engine
from flowgen.run.manifest import Manifest
from flowgen.run.outputs import encode_image
from flowgen.run.records import metadata_from_record
from flowgen.run.references import ReferenceLoader
from flowgen.run.regen import ReplayError, job_of, replay

RESULT_INDEX = 0  # the canary replays each fixed item's first result
# engine identity fields named first in a message (the usual suspects), then any other that changed
IDENTITY_ORDER = ("flowgen", "jax", "device_kind", "dtype", "weights", "model", "card", "attention")


def check_canary(
    manifest: Manifest, plan: Plan, engine: Engine, config: Canary, run_id: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Compare the fixed items with their first renders; record the verdicts.

    Returns (verdicts as plain dicts, one message per failed item); no failure lines means the run may go on.
    """
    threshold = config.threshold_db
    loader = ReferenceLoader()
    verdicts = []
    for item_id in fixed_items(manifest, plan, config.items):
        record = manifest.get(item_id, RESULT_INDEX)
        if record is not None and baseline_problem(record, manifest.out_dir) is None:
            verdicts.append(_compare(record, manifest.out_dir, engine, loader, threshold, run_id, plan.model_identity))
    manifest.record_canary(verdicts)
    failures = [failure_message(v) for v in verdicts if not v["passed"]]
    shown = [
        {k: v[k] for k in ("item_id", "item_key", "psnr_db", "threshold_db", "passed", "changed")} for v in verdicts
    ]
    return shown, failures


def fixed_items(manifest: Manifest, plan: Plan, count: int) -> list[str]:
    """The canary's item ids: those fixed earlier, topped up from the plan's first items (in plan order)."""
    chosen = manifest.canary_items()
    if len(chosen) < count:
        known = set(chosen)
        for item in plan.items:
            if len(chosen) >= count:
                break
            if item.error is None and item.item_id not in known:
                chosen.append(item.item_id)
                known.add(item.item_id)
        manifest.set_canary_items(chosen)
    return chosen[:count]


def baseline_problem(record: dict[str, Any] | None, out_dir: Path) -> str | None:
    """Why a record cannot be compared against (no ok render yet, its file or a reference changed), or None."""
    if record is None or record.get("status") != "ok" or not record.get("batch"):
        return "not rendered yet"
    path = _output_path(record, out_dir)
    if not path.is_file() or sha256_file(path) != record["output"]["sha256"]:
        return "its file is missing or was changed since its render"
    for ref in record.get("references") or []:
        try:
            if reference_sha256(ref["path"]) != ref["sha256"]:
                return f"reference {ref['path']} changed since its render"
        except ValueError as err:  # ReferenceImageError: missing, not a regular file, too large
            return str(err)
    return None


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images in dB (inf when identical, 0 when their sizes differ)."""
    if a.shape != b.shape:
        return 0.0
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def identity_changes(first: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two engine identities, e.g. ["dtype float32 → bfloat16", "weights changed"]."""
    keys = [k for k in IDENTITY_ORDER if k in first or k in now]
    keys += sorted(k for k in set(first) | set(now) if k not in IDENTITY_ORDER)
    changes = []
    for key in keys:
        before, after = first.get(key), now.get(key)
        if before == after:
            continue
        if isinstance(before, (dict, list)) or isinstance(after, (dict, list)):
            changes.append(f"{key} changed")
        else:
            changes.append(f"{key} {_shown(before)} → {_shown(after)}")
    return changes


def failure_message(verdict: dict[str, Any]) -> str:
    """One line: the item, its PSNR against the threshold, and what changed in the engine."""
    psnr = verdict["psnr_db"]
    measured = "could not be re-rendered" if psnr is None else f"renders at {psnr:.1f} dB PSNR against its first render"
    return (
        f"canary: item {verdict['item_key']!r} ({verdict['item_id']}#{verdict['result_index']}) {measured}, "
        f"below {verdict['threshold_db']:g} dB; {verdict['changed']}"
    )


def _compare(
    record: dict[str, Any],
    out_dir: Path,
    engine: Engine,
    loader: ReferenceLoader,
    threshold: float,
    run_id: str,
    model_identity: dict[str, Any],
) -> dict[str, Any]:
    verdict = {
        "run_id": run_id,
        "item_id": record["item_id"],
        "result_index": record["result_index"],
        "item_key": record["item_key"],
        "threshold_db": threshold,
        "first_engine": record.get("engine"),
        "engine": None,
        "checked_at": time.time(),
    }
    try:
        job = job_of(record)
        pixels = np.asarray(replay(record, job, [loader.load(path) for path in job.references], engine), dtype=np.uint8)
    except ReplayError as err:  # an engine that cannot render the item has drifted too
        return {**verdict, "psnr_db": None, "passed": False, "changed": str(err)}
    except ValueError as err:  # a reference that no longer decodes
        return {**verdict, "psnr_db": None, "passed": False, "changed": str(err)}
    now = dict(engine.identity())
    path = _output_path(record, out_dir)
    data = encode_image(pixels, path.suffix.lstrip(".").lower(), job.output_quality, metadata_from_record(record))
    if hashlib.sha256(data).hexdigest() == record["output"]["sha256"]:
        psnr = math.inf
    else:  # compare what both encodings decode to: a lossy format's own error cancels out
        psnr = psnr_db(_decoded(data), _decoded(path.read_bytes()))
    changes = identity_changes(record.get("engine") or {}, now)
    if (record.get("model") or {}).get("identity") != model_identity:
        changes.append("model card identity changed")
    changed = (
        ("engine changed: " + ", ".join(changes))
        if changes
        else "engine identity unchanged (flowgen, jax, device kind, dtype, weights): "
        "look at drivers, XLA flags or hardware"
    )
    return {
        **verdict,
        "engine": now,
        "psnr_db": None if math.isinf(psnr) else round(psnr, 3),
        "passed": psnr >= threshold,
        "changed": changed,
    }


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _output_path(record: dict[str, Any], out_dir: Path) -> Path:
    path = Path(record["output"]["path"])
    return path if path.is_absolute() else Path(out_dir) / path


def _shown(value: Any) -> str:
    text = "(none)" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
