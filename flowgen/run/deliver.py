"""The deliver step of a run: its results' uploads and webhooks through the one dispatcher
(flowgen.delivery.dispatch, which `flowgen serve` uses too), recorded in the run's manifest.

Sinks, in order per result: `upload` (HTTP PUT of the file to `uploadEndpoint`) then `webhook`
(POST of the spec's image result to `webhookURL`; with outputType URL it carries the uploaded URL
when the upload worked, else the file's `file://` URL). A result's deliveries run in the
background while the next batch renders; the manifest is only touched from the run's thread (it
is a DeliveryLog that is not thread-safe: the executor's `collect` calls record the outcomes).

Crash safety: a result's sinks are recorded `pending` in the same step that its record is
committed, and each sink's outcome and every attempt are recorded when it finishes. A run killed
in between leaves `pending` rows, which the next run sends again (so each result is delivered at
most once more); sinks that gave up are `failed` until `flowgen redeliver` sends them. A result
the content checker flagged is `withheld` (kept on disk, marked) unless the run delivers flagged
results on purpose.

Secrets: records hold the sinks' URLs redacted (flowgen.net.redact); the URLs as given, which a
later resend needs, are kept in `OUT/.flowgen/sink-urls.sqlite` (0600, never exported) from the
moment a result's first states are committed until its sinks have all gone through.

Destinations: runs refuse non-public destinations by default as the server does: URL fields may
be filled from dataset values, which need not come from the operator; a refused sink is recorded
`failed` with the reason, and `flowgen redeliver` sends it once the operator has allowed the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowgen.delivery.dispatch import Dispatcher, Finished
from flowgen.delivery.sink_urls import FILE_NAME, SinkURLs
from flowgen.run.manifest import STATE_DIR, Manifest


def run_dispatcher(manifest: Manifest, run_id: str, **options: Any) -> Dispatcher:
    """The dispatcher of a run writing to `manifest` (options: Dispatcher keywords: retry policy,
    workers, deliver_flagged, client, destinations). Failed and withheld sinks keep their URLs
    for `flowgen redeliver`."""
    return Dispatcher(manifest, sink_urls_for(manifest.out_dir), run_id=run_id, redeliverable=True, **options)


def finished_from_record(record: dict[str, Any], out_dir: Path, urls: SinkURLs | None = None) -> Finished:
    """Rebuild what a sink needs from a manifest record (reruns and `flowgen redeliver`): the URLs as
    given from `urls`, else the record's own (manifests written before records were redacted)."""
    params = record.get("params") or {}
    kept = urls.get(record["item_id"], record["result_index"]) if urls is not None else None
    upload, webhook = kept if kept is not None else (params.get("uploadEndpoint"), params.get("webhookURL"))
    path = out_dir / record["output"]["path"]
    return Finished(
        item_id=record["item_id"],
        result_index=record["result_index"],
        path=path,
        filename=record["output"]["path"],
        seed=record["seed"],
        task_uuid=record["taskUUID"],
        image_uuid=record["imageUUID"],
        output_type=params.get("outputType") or "URL",
        upload_endpoint=upload,
        webhook_url=webhook,
        cost=record.get("cost"),
        nsfw=(record.get("safety") or {}).get("NSFWContent"),
        image_url=path.resolve().as_uri(),
    )


def sink_urls_for(out_dir: Path) -> SinkURLs:
    """Where a run folder keeps its sinks' full URLs."""
    return SinkURLs(Path(out_dir) / STATE_DIR / FILE_NAME)


def resend(manifest: Manifest, run_id: str, out_dir: Path, states: tuple[str, ...], **dispatcher_options) -> dict:
    """Send again every sink in `states` (pending after a crash; failed for `flowgen redeliver`).
    Returns the dispatcher's counts."""
    dispatcher = run_dispatcher(manifest, run_id, **dispatcher_options)

    def finished_of(rid: tuple[str, int], sinks: list[str]) -> tuple[Finished, list[str]] | None:
        record = manifest.get(*rid)
        if record is None or record["status"] != "ok":
            return None
        return finished_from_record(record, out_dir, dispatcher.urls), sinks

    try:
        dispatcher.resend(manifest.deliveries(), states, finished_of)
    finally:
        dispatcher.close()
    return dispatcher.counts
