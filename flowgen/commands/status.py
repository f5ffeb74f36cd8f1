"""`flowgen status OUT_DIR`: what the manifest of an output folder holds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click

from flowgen.run.lock import folder_state
from flowgen.run.manifest import Manifest


def status_command(out_dir: str, as_json: bool) -> None:
    """Summarise OUT_DIR's manifest (and refresh its manifest.jsonl export)."""
    with Manifest(out_dir, create=False) as manifest:
        report = status_report(manifest)
        manifest.export_jsonl()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    counts = report["counts"]
    click.echo(f"{report['out_dir']}: {report['results']} result(s) — "
               + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "failed", "skipped")))
    if report["last_run"]:
        run = report["last_run"]
        click.echo(f"last run {run['run_id']} ({run['recipe_name']}): {run['status']}")
    if report["state"] == "running" and report["progress"]:
        p = report["progress"]
        click.echo(f"  running now ({report['holder']}): {p.get('rendered', 0)}/{p.get('to_render', 0)} rendered, "
                   f"{p.get('failed', 0)} failed, batch {p.get('batches_done', 0)}/{p.get('batches', 0)}")
    if report["deliveries"]:
        click.echo("  deliveries: " + ", ".join(f"{n} {state}" for state, n in sorted(report["deliveries"].items()))
                   + (f" (flowgen redeliver {report['out_dir']})" if report["deliveries"].get("failed") else ""))
    if report["expired"]:
        click.echo(f"  {report['expired']} result(s) expired (ttl) and removed by flowgen gc")
    if report["state"] == "stale":
        click.echo(f"  {report['holder']} holds the folder's lock but its heartbeat stopped: it may be hung")
    for failure in report["failed"][:20]:
        click.echo(f"  failed {failure['item_id']}#{failure['result_index']} {failure['item_key']}: {failure['error']}")
    if report["missing_outputs"]:
        click.echo(f"  {len(report['missing_outputs'])} ok result(s) whose file is missing (a run will render them again)")


def status_report(manifest: Manifest) -> dict[str, Any]:
    failed, missing = [], []
    total = 0
    expired = manifest.expired()
    for record in manifest.records():
        total += 1
        if record["status"] == "failed":
            failed.append({k: record[k] for k in ("item_id", "result_index", "item_key", "error")})
        elif (record["status"] == "ok" and (record["item_id"], record["result_index"]) not in expired
              and not (Path(manifest.out_dir) / record["output"]["path"]).exists()):
            missing.append(record["output"]["path"])
    runs = manifest.runs()
    state, holder = folder_state(manifest.out_dir)
    if runs and runs[-1]["status"] == "running" and state == "idle":
        runs[-1]["status"] = "died"  # marked running, but no process holds the folder: killed
    return {
        "state": state,  # running | stale | idle: whether a run holds the folder now
        "holder": holder.describe() if holder and state != "idle" else None,
        "progress": holder.progress if holder and state != "idle" else None,
        "deliveries": dict(Counter(d["state"] for d in manifest.deliveries())),
        "expired": len(expired),
        "out_dir": str(manifest.out_dir),
        "results": total,
        "counts": manifest.counts(),
        "failed": failed,
        "missing_outputs": missing,
        "runs": len(runs),
        "last_run": runs[-1] if runs else None,
    }
