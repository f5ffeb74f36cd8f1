"""`flowgen redeliver OUT_DIR` and `flowgen gc OUT_DIR`: the delivery side of a finished run.

redeliver sends again every upload and webhook that gave up (and any a killed run left pending);
--flagged also sends what the content check withheld. gc removes the files of URL results whose
ttl has run out and records that, so a rerun does not render them again unless they change.
"""

from __future__ import annotations

import time

import click

from flowgen.run.deliver import resend
from flowgen.run.executor import new_run_id
from flowgen.run.lock import RunLock
from flowgen.run.manifest import Manifest
from flowgen.run.output_paths import outside_reason


def redeliver_command(out_dir: str, flagged: bool) -> int:
    """Returns the exit code: 0 when everything sent now arrived, 1 when some still failed."""
    run_id = "redeliver-" + new_run_id()
    states = ("failed", "pending") + (("withheld",) if flagged else ())
    with RunLock(out_dir, run_id), Manifest(out_dir, create=False) as manifest:
        counts = resend(manifest, run_id, manifest.out_dir, states, deliver_flagged=flagged)
        manifest.export_jsonl()
        left = len(manifest.deliveries(("failed",)))
        withheld = len(manifest.deliveries(("withheld",)))
    click.echo(
        f"{out_dir}: {counts['ok']} delivered, {counts['failed']} failed again"
        + (f", {withheld} withheld by the content check (--flagged sends them)" if withheld else "")
    )
    return 1 if left else 0


def gc_command(out_dir: str, dry_run: bool, now: float | None = None) -> None:
    now = time.time() if now is None else now
    with RunLock(out_dir, "gc-" + new_run_id()), Manifest(out_dir, create=False) as manifest:
        expired = manifest.expired()
        due = []
        for record in manifest.records():
            ttl = (record.get("params") or {}).get("ttl")
            rid = (record["item_id"], record["result_index"])
            if record["status"] != "ok" or not ttl or record.get("outputType", "URL") != "URL" or rid in expired:
                continue
            if record["updated_at"] + int(ttl) <= now:
                due.append(record)
        outside = {
            id(r): reason
            for r in due
            if (reason := outside_reason(manifest.out_dir, manifest.out_dir / r["output"]["path"]))
        }
        for record in due:
            path = manifest.out_dir / record["output"]["path"]
            if id(record) in outside:  # never removed through a symlinked folder; not expired either
                click.echo(f"left {record['output']['path']} in place: {outside[id(record)]}")
                continue
            if not dry_run:
                path.unlink(missing_ok=True)
                manifest.expire(record["item_id"], record["result_index"], record["content_hash"])
            click.echo(
                f"{'would remove' if dry_run else 'removed'} {record['output']['path']} "
                f"(ttl {record['params']['ttl']}s ran out)"
            )
        if not dry_run:
            manifest.export_jsonl()
    click.echo(
        f"{out_dir}: {len(due) - len(outside)} expired result(s) {'to remove' if dry_run else 'removed'}"
        + (f", {len(outside)} left in place (outside the output folder)" if outside else "")
    )
