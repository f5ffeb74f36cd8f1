"""Golden-seed canary verdicts for the report, from `Manifest.canary_verdicts()`.

Read defensively: a folder written before the canary existed (or a manifest class without it)
simply has none, and the report then shows no canary section.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from typing import Any

from flowgen.errors import StorageError
from flowgen.run.manifest import Manifest


def canary_verdicts(manifest: Manifest) -> list[dict[str, Any]]:
    """Every recorded verdict as display values, oldest first; [] when there are none."""
    read = getattr(manifest, "canary_verdicts", None)
    if not callable(read):
        return []
    try:
        rows = read()
    except (sqlite3.Error, StorageError):  # a manifest from a flowgen whose canary table differs
        return []
    return [_view(row) for row in rows]


def latest_check(verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The verdicts of the most recent run that checked the canary."""
    if not verdicts:
        return []
    last = verdicts[-1]["run_id"]
    return [v for v in verdicts if v["run_id"] == last]


def _view(row: dict[str, Any]) -> dict[str, Any]:
    psnr = row.get("psnr_db")
    threshold = row.get("threshold_db")
    if isinstance(psnr, (int, float)) and not math.isinf(psnr):
        shown_psnr = f"{float(psnr):.1f} dB"
    else:  # no PSNR: identical files (infinite PSNR) when it passed, no comparison (an engine error) when not
        shown_psnr = "identical" if row.get("passed") else "—"
    return {
        "run_id": str(row.get("run_id") or ""),
        "item_id": row.get("item_id"),
        "result_index": row.get("result_index"),
        "item_key": str(row.get("item_key") or row.get("item_id") or ""),
        "psnr": shown_psnr,
        "threshold": f"{float(threshold):g} dB" if isinstance(threshold, (int, float)) else "—",
        "outcome": "pass" if row.get("passed") else "fail",
        "changed": _text(row.get("changed")),
        "checked": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row["checked_at"]))
        if isinstance(row.get("checked_at"), (int, float))
        else "—",
    }


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, default=str)
    return value if len(value) <= 500 else value[:500] + "…"
