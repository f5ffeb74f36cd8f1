"""Build the report of an output folder: read its manifest into plain views, render one HTML file.

Everything comes from the manifest (results, deliveries, expirations, runs, canary verdicts) and
the image files it points at; nothing is fetched and nothing in the folder changes except the
report itself, written atomically. Thumbnails are embedded as data URIs and each links to its
full-size file by a path relative to the report, so the page works from disk (file://) with no
network: its Content-Security-Policy forbids loading anything that is not inline.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2

from flowgen.report.canary import canary_verdicts, latest_check
from flowgen.report.thumbnails import thumbnail_data_uri
from flowgen.run.atomic import atomic_write_bytes
from flowgen.run.lock import folder_state
from flowgen.run.manifest import Manifest

REPORT_NAME = "report.html"
TEMPLATE = "report.html.j2"
UNDELIVERED = ("pending", "failed")  # what the "pending deliveries" filter shows: not delivered yet
CARD_WIDTH = 180  # px; an item's box is as wide as its results' cards, up to
MAX_CARDS_ACROSS = 6  # this many side by side


@dataclass
class ResultView:
    """One result's card."""

    item_id: str
    result_index: int
    status: str  # ok | failed | skipped
    error: str | None
    seed: Any
    file: str | None  # path inside the output folder
    href: str | None  # the file, relative to the report (only when it exists)
    image: str | None  # thumbnail data URI
    file_note: str | None  # why there is no thumbnail: file missing, expired (ttl), ...
    timings: list[tuple[str, str]]
    batch: str | None
    deliveries: list[dict[str, Any]]
    delivery_pending: bool
    nsfw: str | None  # the content check's verdict, when it ran
    nsfw_flagged: bool
    canary: dict[str, Any] | None  # the latest canary verdict on this result, when it is a canary item
    run_id: str
    updated: str


@dataclass
class ItemView:
    """One item (a prompt x references x parameters) and its results."""

    item_id: str
    item_key: str
    prompt: str
    negative_prompt: str | None
    params: list[tuple[str, str]]
    references: list[str]
    results: list[ResultView] = field(default_factory=list)


def write_report(out_dir: str | Path, output: str | Path | None = None) -> Path:
    """Render the report of `out_dir` to `output` (default OUT_DIR/report.html), atomically."""
    target = Path(output) if output else Path(out_dir) / REPORT_NAME
    html = render_report(out_dir, target)
    atomic_write_bytes(target, html.encode("utf-8"))
    return target


def render_report(out_dir: str | Path, report_path: str | Path) -> str:
    """The report's HTML; links are relative to where `report_path` will be."""
    with Manifest(out_dir, create=False) as manifest:
        context = _context(manifest, Path(report_path))
    return _template().render(**context)


def _template() -> jinja2.Template:
    # read through importlib.resources: found in an installed wheel as well as in a checkout
    source = resources.files("flowgen.report").joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def _context(manifest: Manifest, report_path: Path) -> dict[str, Any]:
    out_dir = manifest.out_dir
    report_dir = report_path.resolve().parent
    expired = manifest.expired()
    deliveries: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for delivery in manifest.deliveries():
        deliveries[(delivery["item_id"], delivery["result_index"])].append(delivery)
    verdicts = canary_verdicts(manifest)
    canary_by_result = {(v["item_id"], v["result_index"]): v for v in verdicts}  # oldest first: the latest wins

    items: dict[str, ItemView] = {}
    for record in manifest.records():
        item = items.get(record["item_id"])
        if item is None:
            item = items[record["item_id"]] = _item_view(record)
        rid = (record["item_id"], record["result_index"])
        item.results.append(
            _result_view(
                record, out_dir, report_dir, rid in expired, deliveries.get(rid, []), canary_by_result.get(rid)
            )
        )

    common = _hoist_common_params(list(items.values()))
    results = [r for item in items.values() for r in item.results]
    counts = Counter(r.status for r in results)
    runs = _runs(manifest)
    return {
        "title": ", ".join(sorted({run["recipe"] for run in runs if run["recipe"]})) or out_dir.name,
        "out_dir": str(out_dir.resolve()),
        "generated": _when(time.time()),
        # failures first: they are what a reader looks for; then in key order
        "items": sorted(
            items.values(), key=lambda i: (all(r.status != "failed" for r in i.results), i.item_key, i.item_id)
        ),
        "card_width": CARD_WIDTH,
        "item_width": _item_width(max((len(i.results) for i in items.values()), default=1)),
        "filters": [
            ("all", "all", len(results)),
            ("ok", "ok", counts.get("ok", 0)),
            ("failed", "failed", counts.get("failed", 0)),
            ("skipped", "skipped", counts.get("skipped", 0)),
            ("pending", "pending deliveries", sum(r.delivery_pending for r in results)),
        ],
        "missing": sum(r.file_note == "file missing" for r in results),
        "expired": len(expired),
        "delivery_counts": sorted(Counter(d["state"] for ds in deliveries.values() for d in ds).items()),
        "common_params": common,
        "runs": runs,
        "canary": latest_check(verdicts),
        "canary_runs": len({v["run_id"] for v in verdicts}),
        "canary_failed_runs": len({v["run_id"] for v in verdicts if v["outcome"] == "fail"}),
    }


def _hoist_common_params(items: list[ItemView]) -> list[tuple[str, str]]:
    """The parameters every item shares, removed from the items (shown once at the top instead)."""
    if len(items) < 2:
        return []
    common = [p for p in items[0].params if all(p in item.params for item in items[1:])]
    for item in items:
        item.params = [p for p in item.params if p not in common]
    return common


def _item_width(cards: int) -> int:
    """Pixels an item's box needs to show `cards` results in a row (cards + gaps + padding)."""
    across = max(1, min(cards, MAX_CARDS_ACROSS))
    return across * CARD_WIDTH + (across - 1) * 10 + 26


def _item_view(record: dict[str, Any]) -> ItemView:
    params = record.get("params") or {}
    shown = [
        ("size", f"{params.get('width', '?')}×{params.get('height', '?')}"),
        ("steps", params.get("steps", "default")),
        ("scheduler", params.get("scheduler") or "Default"),
        ("CFG", params.get("CFGScale", "—")),  # as asked; each card's batch line says whether guidance ran
        ("dtype", record.get("dtype") or "—"),
        ("model", (record.get("model") or {}).get("name") or "—"),
        ("format", (record.get("output") or {}).get("format") or params.get("outputFormat") or "—"),
    ]
    return ItemView(
        item_id=record["item_id"],
        item_key=record["item_key"],
        prompt=str(params.get("positivePrompt") or ""),
        negative_prompt=params.get("negativePrompt") or None,
        params=[(label, str(value)) for label, value in shown],
        references=[Path(str(ref.get("path", ""))).name for ref in record.get("references") or []],
    )


def _result_view(
    record: dict[str, Any],
    out_dir: Path,
    report_dir: Path,
    expired: bool,
    deliveries: list[dict[str, Any]],
    canary: dict[str, Any] | None,
) -> ResultView:
    status = record["status"]
    file = (record.get("output") or {}).get("path")
    path = out_dir / file if file else None
    image = href = note = None
    if status == "ok":
        if expired:
            note = "expired (ttl)"
        elif path is None or not path.is_file():
            note = "file missing"
        else:
            image = thumbnail_data_uri(path)
            note = None if image else "unreadable file"
            href = quote(os.path.relpath(path.resolve(), report_dir).replace(os.sep, "/"))
    safety = record.get("safety")
    nsfw = None
    if isinstance(safety, dict):
        flagged = safety.get("flagged") or []
        nsfw = ("NSFW: " + ", ".join(map(str, flagged))) if safety.get("NSFWContent") else "NSFW check: clean"
    return ResultView(
        item_id=record["item_id"],
        result_index=record["result_index"],
        status=status,
        error=record.get("error"),
        seed=record.get("seed"),
        file=file,
        href=href,
        image=image,
        file_note=note,
        timings=_timings(record.get("timings") or {}),
        batch=_batch(record.get("batch")),
        deliveries=[{k: d.get(k) for k in ("sink", "state", "attempts", "error", "target")} for d in deliveries],
        delivery_pending=any(d["state"] in UNDELIVERED for d in deliveries),
        nsfw=nsfw,
        nsfw_flagged=bool(isinstance(safety, dict) and safety.get("NSFWContent")),
        canary=canary,
        run_id=str(record.get("run_id") or ""),
        updated=_when(record.get("updated_at")),
    )


def _timings(timings: dict[str, Any]) -> list[tuple[str, str]]:
    shown = []
    for key, label in (
        ("engine_per_image", "engine/img"),
        ("check", "check"),
        ("encode", "encode"),
        ("write", "write"),
    ):
        value = timings.get(key)
        if isinstance(value, (int, float)) and (value or key != "check"):  # check is 0 when no content check ran
            shown.append((label, f"{value:.3f} s" if value < 10 else f"{value:.1f} s"))
    return shown


def _batch(batch: dict[str, Any] | None) -> str | None:
    if not batch:
        return None
    return f"{batch.get('position', 0) + 1} of {batch.get('size', '?')}" + (
        f" · {batch['signature']}" if batch.get("signature") else ""
    )


def _runs(manifest: Manifest) -> list[dict[str, Any]]:
    runs = manifest.runs()
    state, _ = folder_state(manifest.out_dir)
    shown = []
    for run in runs:
        status = run["status"]
        if status == "running" and state == "idle":
            status = "died"  # marked running, but nothing holds the folder: it was killed
        summary = run.get("summary") or {}
        finished = run.get("finished_at")
        shown.append(
            {
                "run_id": run["run_id"],
                "recipe": run.get("recipe_name") or "",
                "started": _when(run["started_at"]),
                "finished": _when(finished) if finished else "—",
                "seconds": f"{finished - run['started_at']:.1f} s" if finished else "—",
                "status": status,
                "summary": ", ".join(
                    [
                        f"{summary[k]} {k}"
                        for k in ("planned", "rendered", "unchanged", "failed", "not_run")
                        if isinstance(summary.get(k), int)
                    ]
                    + (
                        [f"canary: {len(summary['canary_failures'])} drifted, nothing rendered"]
                        if summary.get("canary_failures")
                        else []
                    )
                ),
            }
        )
    return shown[::-1]  # newest first


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)):
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
