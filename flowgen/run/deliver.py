"""The deliver step of a run: send each finished result to the sinks its task names.

Sinks, in order per result: `upload` (HTTP PUT of the file to `uploadEndpoint`) then `webhook`
(POST of the spec's image result to `webhookURL`; with outputType URL it carries the uploaded URL
when the upload worked, else the file's `file://` URL). A result's deliveries run in a bounded
thread pool while the next batch renders; the manifest is only touched from the run's thread.

Crash safety: a result's sinks are recorded `pending` in the same step that its record is
committed, and each sink's outcome and every attempt are recorded when it finishes. A run killed
in between leaves `pending` rows, which the next run sends again (so each result is delivered at
most once more); sinks that gave up are `failed` until `flowgen redeliver` sends them. A result
the content checker flagged is `withheld` (kept on disk, marked) unless the run delivers flagged
results on purpose.

Secrets: records hold the sinks' URLs redacted (flowgen.net.redact); the URLs as given, which a
later resend needs, are kept in `OUT/.flowgen/sink-urls.sqlite` (0600, never exported) from the
moment a result's first states are committed until its sinks have all gone through.

Destinations: the client connects only where the destination policy allows (public addresses
plus $FLOWGEN_ALLOW_HOSTS, flowgen.net.policy). Runs refuse non-public destinations by default as
the server does: URL fields may be filled from dataset values, which need not come from the
operator; a refused sink is recorded `failed` with the reason, and `flowgen redeliver` sends it
once the operator has allowed the host.
"""

from __future__ import annotations

import concurrent.futures as futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowgen.delivery.http import DEFAULT_POLICY, Delivery, RetryPolicy
from flowgen.delivery.payload import content_type_for, image_result
from flowgen.delivery.pool import make_client
from flowgen.delivery.sink_urls import FILE_NAME, SinkURLs
from flowgen.delivery.upload import put_file
from flowgen.delivery.webhook import post_result, webhook_secret
from flowgen.net.policy import DestinationPolicy
from flowgen.net.redact import redact_url, redact_webhook_url
from flowgen.recipe.validation import UPLOAD_PLACEHOLDERS  # noqa: F401  (the recipe checks the same names)
from flowgen.run.manifest import STATE_DIR, Manifest

SINKS = ("upload", "webhook")


@dataclass(frozen=True)
class Finished:
    """A result whose file is on disk and whose record is committed: what its sinks need."""

    item_id: str
    result_index: int
    path: Path
    filename: str  # the output's path relative to the output folder
    seed: int
    task_uuid: str
    image_uuid: str
    output_type: str  # URL | dataURI | base64Data
    upload_endpoint: str | None
    webhook_url: str | None
    cost: float | None = None
    nsfw: bool | None = None

    @property
    def rid(self) -> tuple[str, int]:
        return self.item_id, self.result_index

    def sinks(self) -> list[str]:
        return [s for s, url in zip(SINKS, (self.upload_endpoint, self.webhook_url)) if url]

    def upload_url(self) -> str:
        """uploadEndpoint with its per-result placeholders filled in ({result}, {filename},
        {imageUUID}); an endpoint ending in "/" gets the output's file name appended."""
        url = self.upload_endpoint or ""
        url = (url.replace("{result}", str(self.result_index)).replace("{filename}", self.filename)
               .replace("{imageUUID}", self.image_uuid))
        return url + Path(self.filename).name if url.endswith("/") else url


def finished_from_record(record: dict[str, Any], out_dir: Path, urls: SinkURLs | None = None) -> Finished:
    """Rebuild what a sink needs from a manifest record (reruns and `flowgen redeliver`): the URLs as
    given from `urls`, else the record's own (manifests written before records were redacted)."""
    params = record.get("params") or {}
    kept = urls.get(record["item_id"], record["result_index"]) if urls is not None else None
    upload, webhook = kept if kept is not None else (params.get("uploadEndpoint"), params.get("webhookURL"))
    return Finished(
        item_id=record["item_id"], result_index=record["result_index"],
        path=out_dir / record["output"]["path"], filename=record["output"]["path"], seed=record["seed"],
        task_uuid=record["taskUUID"], image_uuid=record["imageUUID"],
        output_type=params.get("outputType") or "URL", upload_endpoint=upload,
        webhook_url=webhook, cost=record.get("cost"),
        nsfw=(record.get("safety") or {}).get("NSFWContent"))


def sink_urls_for(out_dir: Path) -> SinkURLs:
    """Where a run folder keeps its sinks' full URLs."""
    return SinkURLs(Path(out_dir) / STATE_DIR / FILE_NAME)


@dataclass
class _Outcome:
    sink: str
    delivery: Delivery | None  # None: not sent (a bad URL, an unreadable file)
    target: str
    url: str | None = None  # upload: where the file now is
    error: str | None = None

    @property
    def state(self) -> str:
        return "ok" if self.delivery is not None and self.delivery.ok else "failed"


class Dispatcher:
    """Runs the sinks of finished results in a pool and records every outcome (see module doc)."""

    def __init__(self, manifest: Manifest | None, run_id: str, *, policy: RetryPolicy = DEFAULT_POLICY,
                 max_workers: int = 4, deliver_flagged: bool = False, client=None,
                 destinations: DestinationPolicy | None = None, urls: SinkURLs | None = None):
        self.manifest, self.run_id, self.policy = manifest, run_id, policy
        self.deliver_flagged = deliver_flagged
        self.secret = webhook_secret()
        # public addresses plus $FLOWGEN_ALLOW_HOSTS unless told otherwise; read now, so a bad entry is
        # refused before anything is sent
        self.destinations = destinations if destinations is not None else DestinationPolicy.from_env()
        if urls is None:
            if manifest is None:
                raise ValueError("a Dispatcher without a manifest needs `urls` (where the sinks' URLs are kept)")
            urls = sink_urls_for(manifest.out_dir)
        self.urls = urls
        self._client = client
        self._pool: futures.ThreadPoolExecutor | None = None
        self._max_workers = max_workers
        self._running: dict[futures.Future, Finished] = {}
        self.counts = {"ok": 0, "failed": 0, "withheld": 0}

    # --- main thread ---------------------------------------------------------------------
    def first_states(self, finished: list[Finished]) -> list[tuple[str, int, str, str, str | None]]:
        """The (item_id, result_index, sink, state, error) rows to commit with the results' records:
        `pending`, or `withheld` when the content check flagged it. Keeps the sinks' URLs as given
        first, so a resend after a kill finds them."""
        self.urls.keep((f.item_id, f.result_index, f.upload_endpoint, f.webhook_url) for f in finished if f.sinks())
        return [(f.item_id, f.result_index, sink, "withheld" if self.withholds(f) else "pending",
                 "flagged by the content check" if self.withholds(f) else None)
                for f in finished for sink in f.sinks()]

    def submit(self, finished: Finished, sinks: list[str] | None = None) -> None:
        """Send the result's sinks (or only `sinks`) in the background. Their `pending` (or
        `withheld`) states must be committed first, with the result's record."""
        sinks = [] if self.withholds(finished) else (sinks or finished.sinks())
        if not sinks:
            return
        if self._pool is None:
            self._client = self._client or make_client(self._max_workers, self.destinations)
            self._pool = futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="flowgen-deliver")
        self._running[self._pool.submit(self._deliver, finished, sinks)] = finished
        self.collect()

    def collect(self, wait: bool = False) -> None:
        """Record the outcomes of deliveries that finished (all of them, with wait=True)."""
        if not self._running:
            return
        done = futures.wait(self._running, return_when=futures.ALL_COMPLETED if wait else futures.FIRST_COMPLETED,
                            timeout=None if wait else 0).done
        for future in done:
            finished = self._running.pop(future)
            outcomes = future.result()
            for outcome in outcomes:
                self._record(finished, outcome)
            if all(outcome.state == "ok" for outcome in outcomes):
                self.urls.forget(*finished.rid)  # every sink went through: nothing left to resend

    def close(self) -> None:
        self.collect(wait=True)
        if self._pool is not None:
            self._pool.shutdown()
            self._client.close()
        self.urls.close()

    def _record(self, finished: Finished, outcome: _Outcome) -> None:
        assert self.manifest is not None  # a dispatcher without one (the server's) records elsewhere
        attempts = outcome.delivery.attempts if outcome.delivery else []
        self.manifest.add_attempts(finished.item_id, finished.result_index, outcome.sink, self.run_id,
                                   [_attempt_row(a) for a in attempts])
        error = outcome.error or (None if outcome.state == "ok" else _last_error(outcome.delivery))
        self.manifest.set_delivery(finished.item_id, finished.result_index, outcome.sink, outcome.state,
                                   target=outcome.target, url=outcome.url, error=error, attempts=len(attempts))
        self.counts[outcome.state] += 1

    def withholds(self, finished: Finished) -> bool:
        """Whether the content check's flag keeps this result from its sinks."""
        return bool(finished.nsfw) and not self.deliver_flagged

    # --- pool threads (no manifest access here) ---------------------------------------------
    def _deliver(self, finished: Finished, sinks: list[str]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        uploaded: str | None = None
        if "upload" in sinks:
            outcome = self._upload(finished)
            uploaded = outcome.url if outcome.state == "ok" else None
            outcomes.append(outcome)
        elif finished.upload_endpoint:  # a webhook resent alone still names the uploaded file
            uploaded = redact_url(finished.upload_url())
        if "webhook" in sinks:
            outcomes.append(self._webhook(finished, uploaded))
        return outcomes

    def _upload(self, finished: Finished) -> _Outcome:
        url = finished.upload_url()
        target = redact_url(url)
        try:
            delivery = put_file(self._client, url, finished.path, content_type=content_type_for(finished.path.suffix),
                                policy=self.policy)
        except (ValueError, OSError) as err:
            return _Outcome("upload", None, target, error=str(err))
        return _Outcome("upload", delivery, target, url=target if delivery.ok else None)

    def _webhook(self, finished: Finished, uploaded: str | None) -> _Outcome:
        target = redact_webhook_url(finished.webhook_url or "")
        try:
            content_type = content_type_for(finished.path.suffix)
            data = None if finished.output_type == "URL" else finished.path.read_bytes()
            payload = image_result(task_uuid=finished.task_uuid, image_uuid=finished.image_uuid, seed=finished.seed,
                                   output_type=finished.output_type, image=data,
                                   image_url=uploaded or finished.path.resolve().as_uri(),
                                   content_type=content_type, cost=finished.cost, nsfw_content=finished.nsfw)
            delivery = post_result(self._client, finished.webhook_url or "", payload, secret=self.secret, policy=self.policy)
        except (ValueError, OSError) as err:
            return _Outcome("webhook", None, target, error=str(err))
        return _Outcome("webhook", delivery, target)


def _attempt_row(attempt) -> dict[str, Any]:
    return {"attempt": attempt.number, "started_at": attempt.started_at, "seconds": attempt.seconds,
            "status_code": attempt.status_code, "error": attempt.error, "outcome": attempt.outcome}


def _last_error(delivery: Delivery | None) -> str | None:
    if delivery is None or not delivery.attempts:
        return None
    last = delivery.attempts[-1]
    return last.error or (f"HTTP {last.status_code}" if last.status_code else last.outcome)


def resend(manifest: Manifest, run_id: str, out_dir: Path, states: tuple[str, ...], **dispatcher_options) -> dict:
    """Send again every sink in `states` (pending after a crash; failed for `flowgen redeliver`).
    Returns the dispatcher's counts."""
    rows = manifest.deliveries(states)
    by_result: dict[tuple[str, int], list[str]] = {}
    for row in rows:
        by_result.setdefault((row["item_id"], row["result_index"]), []).append(row["sink"])
    dispatcher = Dispatcher(manifest, run_id, **dispatcher_options)
    try:
        for rid, sinks in by_result.items():
            record = manifest.get(*rid)
            if record is None or record["status"] != "ok":
                continue
            finished = finished_from_record(record, out_dir, dispatcher.urls)
            if dispatcher.withholds(finished):
                continue
            dispatcher.submit(finished, [s for s in SINKS if s in sinks])
    finally:
        dispatcher.close()
    return dispatcher.counts
