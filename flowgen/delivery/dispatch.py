"""The one dispatcher of `flowgen run` and `flowgen serve`: send each finished result to the sinks its task names.

Sinks, in order per result: `upload` (HTTP PUT of the file to `uploadEndpoint`, templated per
result) then `webhook` (POST of the spec's image result to `webhookURL`, signed from
$FLOWGEN_WEBHOOK_SECRET[_FILE]; with outputType URL it carries the uploaded URL when the upload
worked, else the result's own `image_url`: a run's file:// URL, the server's signed image URL).

Deliveries run in lanes (flowgen.delivery.pool.Lanes): at most `per_destination` at once to one
destination (scheme, host, port) and `per_key` at once for one API key (a server's results carry
their key's digest as `owner`), `max_workers` in all. A receiver that never answers holds its own
lanes' threads for its retry policy; every other lane goes on. The client connects only where the
destination policy allows (public addresses plus $FLOWGEN_ALLOW_HOSTS, flowgen.net.policy).

Crash safety, with the owner's help: `first_states` gives the rows the owner commits with the
result's record (`pending`; `withheld` when the content check flagged it and flagged results are
not delivered), and keeps the sinks' URLs as given (flowgen.delivery.sink_urls) for a resend after
a kill; every outcome and attempt is then recorded in the owner's DeliveryLog (flowgen.delivery.log),
and the URLs are forgotten once nothing is left to send. `resend` sends again what a log holds in
some states (a killed run's or server's `pending`, `flowgen redeliver`'s `failed`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from flowgen.delivery.http import DEFAULT_POLICY, RetryPolicy, check_url
from flowgen.delivery.log import SINKS, DeliveryLog, SinkOutcome, SinkState, by_result
from flowgen.delivery.payload import content_type_for, image_result
from flowgen.delivery.pool import Lanes, make_client, origin
from flowgen.delivery.sink_urls import SinkURLs
from flowgen.delivery.upload import put_file
from flowgen.delivery.webhook import post_result, webhook_secret
from flowgen.net.policy import DestinationPolicy
from flowgen.net.redact import redact_url, redact_webhook_url

PER_DESTINATION = 4  # deliveries in flight to one scheme://host:port
PER_KEY = 8  # deliveries in flight for one API key, all its destinations together
FLAGGED = "flagged by the content check"


@dataclass(frozen=True)
class Finished:
    """A result whose file is stored and whose record is committed: what its sinks need."""

    item_id: str  # a run's item id, a server's taskUUID
    result_index: int
    path: Path  # the file
    filename: str  # the name {filename} fills an uploadEndpoint with (a run's: relative to its folder)
    seed: int
    task_uuid: str
    image_uuid: str
    output_type: str  # URL | dataURI | base64Data
    upload_endpoint: str | None
    webhook_url: str | None
    cost: float | None = None
    nsfw: bool | None = None
    image_url: str | None = None  # where a webhook says the image is when nothing was uploaded (a run's file:// URL)
    owner: str | None = None  # the API key's digest (a server's result): its deliveries share that key's lane

    @property
    def rid(self) -> tuple[str, int]:
        return self.item_id, self.result_index

    def sinks(self) -> list[str]:
        return [s for s, url in zip(SINKS, (self.upload_endpoint, self.webhook_url)) if url]

    def upload_url(self) -> str:
        """uploadEndpoint with its per-result placeholders filled in ({result}, {filename},
        {imageUUID}); an endpoint ending in "/" gets the file name appended."""
        url = self.upload_endpoint or ""
        url = (
            url.replace("{result}", str(self.result_index))
            .replace("{filename}", self.filename)
            .replace("{imageUUID}", self.image_uuid)
        )
        return url + Path(self.filename).name if url.endswith("/") else url


class Dispatcher:
    """Sends finished results' sinks in lanes and records every outcome in `log` (see module doc).

    redeliverable: failed and withheld sinks may be sent again later (a run's `flowgen redeliver`),
    so their URLs as given are kept until they go through; else (a server) only pending ones are."""

    def __init__(
        self,
        log: DeliveryLog,
        urls: SinkURLs,
        *,
        run_id: str,
        policy: RetryPolicy = DEFAULT_POLICY,
        max_workers: int = 4,
        per_destination: int = PER_DESTINATION,
        per_key: int = PER_KEY,
        deliver_flagged: bool = False,
        redeliverable: bool = True,
        client: httpx.Client | None = None,
        destinations: DestinationPolicy | None = None,
    ):
        self.log, self.urls, self.run_id, self.policy = log, urls, run_id, policy
        self.max_workers, self.per_destination, self.per_key = max_workers, per_destination, per_key
        self.deliver_flagged, self.redeliverable = deliver_flagged, redeliverable
        self.secret = webhook_secret()
        # public addresses plus $FLOWGEN_ALLOW_HOSTS unless told otherwise; read now, so a bad entry is
        # refused before anything is sent
        self.destinations = destinations if destinations is not None else DestinationPolicy.from_env()
        self.counts = {"ok": 0, "failed": 0, "withheld": 0}
        self._client = client
        self._lanes: Lanes | None = None
        self._lock = threading.Lock()  # submitters start the lanes; delivery threads count outcomes
        self._unrecorded: queue.SimpleQueue = queue.SimpleQueue()  # (outcome, finished | None) for collect()

    # --- the owner's thread(s) --------------------------------------------------------------

    def check_destination(self, url: str) -> None:
        """ValueError when `url` is not http(s), or its host is a literal address (or localhost) the
        destination policy refuses (host names are checked when connecting)."""
        check_url(url)
        problem = self.destinations.literal_problem(urlsplit(url).hostname or "")
        if problem:
            raise ValueError(problem)

    def withholds(self, finished: Finished) -> bool:
        """Whether the content check's flag keeps this result from its sinks."""
        return bool(finished.nsfw) and not self.deliver_flagged

    def first_states(self, finished: Iterable[Finished]) -> list[SinkState]:
        """The rows to commit with the results' records: each sink `pending`, or `withheld` when the
        content check flagged it. Keeps the sinks' URLs as given first (those that may be sent
        later), so a resend after a kill finds them."""
        rows: list[SinkState] = []
        kept = []
        for f in finished:
            withheld = self.withholds(f)
            if not withheld or self.redeliverable:
                kept.append((f.item_id, f.result_index, f.upload_endpoint, f.webhook_url))
            rows += [
                SinkState(
                    f.item_id,
                    f.result_index,
                    sink,
                    "withheld" if withheld else "pending",
                    FLAGGED if withheld else None,
                )
                for sink in f.sinks()
            ]
        self.urls.keep(kept)
        return rows

    def submit(
        self,
        finished: Finished,
        sinks: list[str] | None = None,
        *,
        uploaded_url: str | None = None,
        on_uploaded: Callable[[], None] | None = None,
    ) -> None:
        """Send the result's sinks (or only `sinks`) in the background; their first states must be
        committed first, with the result's record. uploaded_url: where an earlier upload put the
        file (a webhook resent alone names it). on_uploaded: called once, when the upload's outcome
        is recorded in a thread-safe log, or at once when no upload is sent."""
        sinks = [] if self.withholds(finished) else [s for s in SINKS if s in (sinks or finished.sinks())]
        if "upload" not in sinks and on_uploaded is not None:
            on_uploaded()
            on_uploaded = None
        if not sinks:
            return
        first = finished.upload_url() if "upload" in sinks else finished.webhook_url
        limits: dict[Any, int] = {("destination", origin(first)): self.per_destination}
        if finished.owner:
            limits[("key", finished.owner)] = self.per_key
        with self._lock:
            if self._lanes is None:
                self._client = self._client or make_client(self.max_workers, self.destinations)
                self._lanes = Lanes(self.max_workers)
            self._lanes.submit(lambda: self._deliver(finished, sinks, uploaded_url, on_uploaded), limits)
        self.collect()  # what finished meanwhile, recorded as the owner goes

    def resend(
        self,
        rows: list[dict[str, Any]],
        states: Iterable[str],
        finished_of: Callable[[tuple[str, int], list[str]], tuple[Finished, list[str]] | None],
    ) -> int:
        """Send again the sinks of a log's `rows` that are in `states`. finished_of(rid, sinks) gives
        the result's Finished and the sinks to send of those (None: skip it). Returns how many
        results were submitted."""
        states = tuple(states)
        uploaded = {
            (r["item_id"], r["result_index"]): r["url"] for r in rows if r["sink"] == "upload" and r["state"] == "ok"
        }
        submitted = 0
        for rid, sinks in by_result(r for r in rows if r["state"] in states).items():
            found = finished_of(rid, sinks)
            if found is None or not found[1] or self.withholds(found[0]):
                continue
            self.submit(found[0], found[1], uploaded_url=uploaded.get(rid))
            submitted += 1
        return submitted

    def collect(self) -> None:
        """Record the outcomes that delivery threads left for a log that is not thread-safe (on
        the thread that owns it); nothing to do for one that is."""
        while True:
            try:
                outcome, finished = self._unrecorded.get_nowait()
            except queue.Empty:
                return
            if outcome is not None:
                self._record(outcome)
            if finished is not None:
                self.urls.forget(*finished.rid)

    def close(self) -> None:
        """Wait for every delivery in flight or queued (each gives up within its retry policy),
        record what is left, and close."""
        with self._lock:
            lanes, self._lanes = self._lanes, None
        if lanes is not None:
            lanes.close()
        self.collect()
        if self._client is not None and lanes is not None:
            self._client.close()
            self._client = None
        self.urls.close()

    # --- delivery threads ---------------------------------------------------------------------

    def _deliver(
        self, finished: Finished, sinks: list[str], uploaded: str | None, on_uploaded: Callable[[], None] | None
    ) -> None:
        failed = False
        try:
            if "upload" in sinks:
                outcome = self._upload(finished)
                uploaded = outcome.url if outcome.state == "ok" else None
                failed = outcome.state == "failed"
                self._done(outcome)
        finally:
            if on_uploaded is not None:
                on_uploaded()
        if "webhook" in sinks:
            outcome = self._webhook(finished, uploaded or finished.image_url)
            failed = failed or outcome.state == "failed"
            self._done(outcome)
        if not (failed and self.redeliverable):  # nothing left to send: its URLs as given go
            self._done(forget=finished)

    def _done(self, outcome: SinkOutcome | None = None, forget: Finished | None = None) -> None:
        """Record an outcome (or forget a result's URLs, after its outcomes) now in a thread-safe
        log, else leave it for collect() on the log's thread."""
        if not self.log.thread_safe:
            self._unrecorded.put((outcome, forget))
        elif outcome is not None:
            self._record(outcome)
        elif forget is not None:
            self.urls.forget(*forget.rid)

    @property
    def _connected(self) -> httpx.Client:
        assert self._client is not None  # made with the lanes, before any delivery runs
        return self._client

    def _record(self, outcome: SinkOutcome) -> None:
        self.log.record_delivery(outcome, self.run_id)
        with self._lock:
            self.counts[outcome.state] += 1

    def _upload(self, finished: Finished) -> SinkOutcome:
        url = finished.upload_url()
        target = redact_url(url)
        try:
            delivery = put_file(
                self._connected,
                url,
                finished.path,
                content_type=content_type_for(finished.path.suffix),
                policy=self.policy,
            )
        except (ValueError, OSError) as err:
            return SinkOutcome(finished.item_id, finished.result_index, "upload", None, target, error=str(err))
        return SinkOutcome(
            finished.item_id, finished.result_index, "upload", delivery, target, url=target if delivery.ok else None
        )

    def _webhook(self, finished: Finished, image_url: str | None) -> SinkOutcome:
        target = redact_webhook_url(finished.webhook_url or "")
        try:
            data = None if finished.output_type == "URL" else finished.path.read_bytes()
            payload = image_result(
                task_uuid=finished.task_uuid,
                image_uuid=finished.image_uuid,
                seed=finished.seed,
                output_type=finished.output_type,
                image=data,
                image_url=image_url,
                content_type=content_type_for(finished.path.suffix),
                cost=finished.cost,
                nsfw_content=finished.nsfw,
            )
            delivery = post_result(
                self._connected, finished.webhook_url or "", payload, secret=self.secret, policy=self.policy
            )
        except (ValueError, OSError) as err:
            return SinkOutcome(finished.item_id, finished.result_index, "webhook", None, target, error=str(err))
        return SinkOutcome(finished.item_id, finished.result_index, "webhook", delivery, target)
