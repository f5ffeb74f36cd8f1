"""`flowgen status OUT_DIR`: what the manifest of an output folder holds, and what is still to do.

It counts the results the recipe held when the latest run started (the manifest's planned set,
flowgen.run.manifest.Manifest.record_plan): rendered, failed, skipped, expired, and those not
rendered yet (a run stopped by Ctrl-C, --limit, --budget or a crash). Results the manifest still
holds but the recipe no longer does are counted apart (`flowgen prune` removes them). Every word
it prints is explained in a legend at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from flowgen.errors import StorageError
from flowgen.run.lock import STALE_AFTER_SECONDS, folder_state, process_exists
from flowgen.run.manifest import JSONL_NAME, Manifest
from flowgen.run.merge import fold_shards, shard_counts
from flowgen.run.shards import shard_files, shard_states

SHOW_FAILURES = 20

# What each word `status` prints means, by what it describes.
LEGEND: dict[str, dict[str, str]] = {
    "result": {
        "ok": "rendered and recorded; its file is in the output folder",
        "failed": "tried and failed (reason listed); the next run tries it again",
        "skipped": "not tried: --fail-fast stopped the run first; the next run renders it",
        "not rendered yet": "planned but not rendered (Ctrl-C, --limit, --budget, a crash, or still running); "
        "the next run renders it",
        "expired": "its ttl ran out and `flowgen gc` removed the file; rendered again only if it changes",
        "no longer in the recipe": "in the manifest, but the recipe no longer holds its item; "
        "`flowgen prune` removes it",
    },
    "run": {
        "ok": "the last run finished and every result it tried succeeded",
        "failed": "the last run finished, but some results failed (listed), or an error ended it (shown, with its log)",
        "starting": "a run started with --detach whose process is alive but has not taken the folder yet",
        "interrupted": "the last run was stopped by Ctrl-C after a batch; the manifest is consistent",
        "died": "the last run was killed (or its machine went down) mid-run, or a detached run's process ended "
        "before it started (see its log); the next run completes its work",
        "running": "a run holds the folder now and its heartbeat is recent",
        "stale": "a process holds the folder's lock but its heartbeat stopped: it may be hung",
    },
    "delivery": {
        "pending": "not sent yet (or a killed run left it); the next run or `flowgen redeliver` sends it",
        "ok": "uploaded / webhook delivered",
        "failed": "gave up after its retries; `flowgen redeliver` sends it again",
        "withheld": "flagged by the content check and not sent; `flowgen redeliver --flagged` sends it",
    },
}


def status_command(out_dir: str, as_json: bool) -> None:
    """Summarise OUT_DIR's manifest (and refresh its manifest.jsonl export), shard runs' folded in."""
    fold_shards(out_dir)  # what shard runs recorded (flowgen.run.merge)
    with Manifest(out_dir, create=False) as manifest:
        report = status_report(manifest)
        try:
            manifest.export_jsonl()
            stale_export = None
        except StorageError as err:  # a full disk: the status is still worth showing
            stale_export = err
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        for line in status_lines(report):
            click.echo(line)
    if stale_export is not None:
        click.echo(f"note: {JSONL_NAME} was not refreshed: {stale_export}", err=True)


def status_report(manifest: Manifest) -> dict[str, Any]:
    """The folder's state as JSON-able data (what `status --json` prints); `legend` explains the words used."""
    planned = manifest.planned()  # None: no run recorded its plan (a manifest from an older flowgen)
    expired = manifest.expired()
    held: list[dict] = []
    removed: list[dict] = []
    for record in manifest.records():
        rid = (record["item_id"], record["result_index"])
        (held if planned is None or rid in planned else removed).append(record)
    held_ids = {(r["item_id"], r["result_index"]) for r in held}
    failed, missing = [], []
    for record in held:
        if record["status"] == "failed":
            failed.append({k: record[k] for k in ("item_id", "result_index", "item_key", "error")})
        elif (
            record["status"] == "ok"
            and (record["item_id"], record["result_index"]) not in expired
            and not (Path(manifest.out_dir) / record["output"]["path"]).exists()
        ):
            missing.append(record["output"]["path"])
    # the lock before the runs: a run lets go of the folder only after its end is recorded, so a
    # folder found idle here has its last run's end in the runs read next (flowgen.run.lock)
    state, holder = folder_state(manifest.out_dir)
    runs = manifest.runs()
    if runs and state == "idle":
        _mark_gone(runs[-1])
    counts = dict(Counter(r["status"] for r in held))
    held_expired = sum(1 for rid in expired if rid in held_ids)
    not_rendered = None if planned is None else len(planned - held_ids)
    deliveries = dict(
        Counter(
            d["state"]
            for d in manifest.deliveries()
            if planned is None or (d["item_id"], d["result_index"]) in held_ids
        )
    )
    recipe = manifest.last_recipe()
    report = {
        "state": state,  # running | stale | idle: whether a run holds the folder now
        "holder": holder.describe() if holder and state != "idle" else None,
        "progress": holder.progress if holder and state != "idle" else None,
        "deliveries": deliveries,
        "expired": held_expired,
        "out_dir": str(manifest.out_dir),
        "recipe": recipe,
        "planned": None if planned is None else len(planned),  # None: not recorded (older manifest)
        "results": len(held),  # the recipe's results the manifest holds a row for
        "counts": counts,  # of those, by status (ok includes expired ones)
        "not_rendered": not_rendered,
        "removed": {
            "count": len(removed),
            "results": [f"{r['item_id']}#{r['result_index']}" for r in removed[:SHOW_FAILURES]],
        },
        "failed": failed,
        "missing_outputs": missing,
        "runs": len(runs),
        "last_run": runs[-1] if runs else None,
        "shards": shard_report(manifest),  # every shard held now, or not folded yet (run --shard)
    }
    report["legend"] = _legend(report)
    return report


def shard_report(manifest: Manifest, now: float | None = None) -> list[dict[str, Any]]:
    """Every shard of the folder that a process holds now (running, or stale) or whose manifest is
    not folded yet: its holder, heartbeat and progress, and the results its manifest holds, of which
    `unmerged` are not in the main manifest yet (flowgen.run.shards, flowgen.run.merge)."""
    now = time.time() if now is None else now
    held = {name: (state, holder) for name, state, holder in shard_states(manifest.out_dir, now)}
    files = {path.stem: path for path in shard_files(manifest.out_dir)}
    shards = []
    for name in sorted(set(held) | set(files), key=lambda n: tuple(int(k) for k in n.split("-of-"))[::-1]):
        state, holder = held.get(name, ("idle", None))
        counts = shard_counts(manifest, files[name]) if name in files else None
        shards.append(
            {
                "shard": name.replace("-of-", "/"),
                "state": state,
                "holder": holder.describe() if holder else None,
                "heartbeat_age_s": round(now - holder.heartbeat_at, 1) if holder else None,
                "progress": holder.progress if holder else None,
                "results": counts[0] if counts else 0,
                "unmerged": counts[1] if counts else 0,
            }
        )
    return shards


def _mark_gone(run: dict[str, Any]) -> None:
    """A last run the manifest still calls running or starting while no process holds the folder:
    "died" (killed mid-run, or a detached run's process that ended before its run started)."""
    summary = run.get("summary") or {}
    if run["status"] == "running":
        run["status"] = "died"
    elif run["status"] == "starting" and not _launched_process_alive(summary, run["started_at"]):
        run["status"] = "died"
        run["summary"] = {**summary, "error": "its background process ended before the run started"}


def _launched_process_alive(summary: dict[str, Any], launched_at: float) -> bool:
    pid = summary.get("pid")
    if pid is None:  # the launcher has not recorded it yet (an instant), or died before it could
        return time.time() - launched_at < STALE_AFTER_SECONDS
    return process_exists(int(pid))


def status_lines(report: dict[str, Any]) -> list[str]:
    """The text `status` prints for a report."""
    out, counts = report["out_dir"], report["counts"]
    parts = [f"{counts.get('ok', 0)} ok", f"{counts.get('failed', 0)} failed"]
    parts += [f"{counts[s]} {s}" for s in ("skipped",) if counts.get(s)]
    if report["expired"]:
        parts.append(f"{report['expired']} expired")
    if report["planned"] is None:
        lines = [
            f"{out}: {report['results']} result(s): {', '.join(parts)} "
            "(what the recipe plans is recorded from the next run on)"
        ]
    else:
        todo = report["not_rendered"]
        parts.append(f"{todo} not rendered yet" + (f" ({_who_renders(report)})" if todo else ""))
        lines = [f"{out}: {report['planned']} planned: {', '.join(parts)}"]
    removed = report["removed"]["count"]
    if removed:
        lines.append(
            f"  {removed} result(s) no longer in the recipe, not counted above (flowgen prune {out} removes them)"
        )
    run = report["last_run"]
    if run:
        summary = run.get("summary") or {}
        why = f": {summary['error']}" if summary.get("error") and run["status"] in ("failed", "died") else ""
        log = f" (log: {summary['log']})" if summary.get("log") and why else ""
        lines.append(f"last run {run['run_id']} ({run['recipe_name']}): {run['status']}{why}{log}")
    if report["shards"]:
        lines += [_shard_line(shard, out) for shard in report["shards"]]
    elif report["state"] == "running" and report["progress"]:
        lines.append(f"  running now ({report['holder']}): {_progress_text(report['progress'])}")
    if report["state"] == "stale" and not report["shards"]:
        lines.append(f"  stale: {report['holder']} holds the folder's lock but its heartbeat stopped: it may be hung")
    if report["deliveries"]:
        lines.append(
            "  deliveries: "
            + ", ".join(f"{n} {s}" for s, n in sorted(report["deliveries"].items()))
            + (f" (flowgen redeliver {out})" if report["deliveries"].get("failed") else "")
        )
    for failure in report["failed"][:SHOW_FAILURES]:
        lines.append(
            f"  failed {failure['item_id']}#{failure['result_index']} {failure['item_key']}: {failure['error']}"
        )
    if len(report["failed"]) > SHOW_FAILURES:
        lines.append(f"  ... {len(report['failed']) - SHOW_FAILURES} more failed (status --json lists them all)")
    if report["missing_outputs"]:
        lines.append(
            f"  {len(report['missing_outputs'])} ok result(s) whose file is missing (a run will render them again)"
        )
    if report["legend"]:
        lines.append("what the words mean:")
        lines += [
            f"  {word} ({kind}): {meaning}"
            for kind, words in report["legend"].items()
            for word, meaning in words.items()
        ]
    return lines


def _progress_text(progress: dict[str, Any]) -> str:
    """A run's progress as its heartbeat says it."""
    if progress.get("stage") == "canary":
        return "checking the canary (or waiting for the shard that checks it); nothing rendered yet"
    if "to_render" not in progress:
        return "starting (planning, loading the model)"
    return (
        f"{progress.get('rendered', 0)}/{progress.get('to_render', 0)} rendered, {progress.get('failed', 0)} failed, "
        f"batch {progress.get('batches_done', 0)}/{progress.get('batches', 0)}"
    )


def _shard_line(shard: dict[str, Any], out: str) -> str:
    """One shard: its state, holder and heartbeat, its progress, and what of its manifest is merged."""
    if shard["state"] == "idle":
        head = f"  shard {shard['shard']}: no process holds it"
    else:
        beat = f"heartbeat {shard['heartbeat_age_s']:.0f}s ago"
        head = f"  shard {shard['shard']} {shard['state']}: {shard['holder']}, {beat}"
        head += (
            ": its heartbeat stopped, it may be hung"
            if shard["state"] == "stale"
            else f": {_progress_text(shard['progress'] or {})}"
        )
    merged = (
        "all merged"
        if not shard["unmerged"]
        else f"{shard['unmerged']} not merged yet (flowgen merge {out}, or when the shard ends)"
    )
    return f"{head}; {shard['results']} result(s) in its manifest, {merged}"


def _legend(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The LEGEND entries of the words this report's text shows."""
    counts = report["counts"]
    shown = {
        "result": ["ok", "failed"]
        + [w for w in ("skipped",) if counts.get(w)]
        + (["expired"] if report["expired"] else [])
        + (["not rendered yet"] if report["planned"] is not None else [])
        + (["no longer in the recipe"] if report["removed"]["count"] else []),
        "run": ([report["last_run"]["status"]] if report["last_run"] else [])
        + ([report["state"]] if report["state"] != "idle" else []),
        "delivery": sorted(report["deliveries"]),
    }
    return {
        kind: {w: LEGEND[kind][w] for w in dict.fromkeys(words) if w in LEGEND[kind]}
        for kind, words in shown.items()
        if any(w in LEGEND[kind] for w in words)
    }


def _who_renders(report: dict[str, Any]) -> str:
    """What renders the results not rendered yet: the run (or shard runs) holding the folder now,
    else the command that runs the last run's recipe again with its options (--set, and --out when
    it had one)."""
    if report["state"] == "running":
        return "the shard runs in progress render them" if report["shards"] else "the run in progress renders them"
    if report["state"] == "stale":
        return "once the stale run is gone, `flowgen run` on its recipe renders them"
    return "flowgen run " + _recipe_shown(report) + " renders them"


def _recipe_shown(report: dict[str, Any]) -> str:
    """The recipe the last run used, relative to here when it is below, with its --set options and,
    when the run was given one, --out (this folder as `status` was given it): what to type to run it again."""
    recipe = report.get("recipe") or {}
    path = recipe.get("path")
    if not path:
        return "RECIPE --out " + shlex.quote(report["out_dir"])
    try:
        shown = os.path.relpath(path)
    except ValueError:
        shown = path
    shown = path if shown.startswith("..") else shown
    parts = [shown] + [a for o in recipe.get("overrides") or () for a in ("--set", o)]
    if recipe.get("out_option"):
        parts += ["--out", report["out_dir"]]
    return " ".join(shlex.quote(part) for part in parts)
