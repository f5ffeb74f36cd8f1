"""webhookURL / uploadEndpoint for `flowgen serve`: the recipe runs' sinks, recorded in the server's store.

The sending is flowgen.run.deliver's Dispatcher (uploadEndpoint templated per result, PUT of the
file, then the spec's image result POSTed to webhookURL, signed from FLOWGEN_WEBHOOK_SECRET[_FILE],
retries, redacted URLs, destinations checked by flowgen.net.policy); only where outcomes are
recorded differs: the store's `deliveries` table instead of a run's manifest, written from the
delivery threads as each sink finishes (the store serialises its own writes), so the batcher's
thread never waits for a receiver.

Isolation: deliveries run in lanes (flowgen.delivery.pool.Lanes), at most PER_DESTINATION at once
to one destination (scheme, host, port) and PER_KEY at once for one API key. A receiver that never
answers holds its own lane's threads for its retry policy; other keys' and destinations' deliveries
go on. A task's answer does not wait for a slow sink: it waits for a result's upload at most
`upload_wait_s` (then the answer's imageURL is this server's URL, and getResponse names the
uploaded one once the upload is recorded).

Secrets: the store keeps the task's URLs redacted; the URLs as given are kept in
DATA_DIR/sink-urls.sqlite (0600) from the moment a result's sinks are recorded `pending` until none
is pending any more. A result's sinks are recorded `pending` with the result itself
(Store.add_result); a server killed before they finished sends those once more when it starts
again (`resend_pending`).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowgen.delivery.http import DEFAULT_POLICY, RetryPolicy, check_url
from flowgen.delivery.pool import Lanes, make_client, origin
from flowgen.delivery.sink_urls import FILE_NAME, SinkURLs
from flowgen.net.policy import DestinationPolicy
from flowgen.run.deliver import SINKS, Dispatcher, Finished, _last_error, _Outcome
from flowgen.serve.store import Store

PER_DESTINATION = 4  # deliveries in flight to one scheme://host:port
PER_KEY = 8  # deliveries in flight for one API key, all its destinations together
MAX_WORKERS = 64  # delivery threads in all (started as needed)
UPLOAD_WAIT_S = 5.0  # how long a task's answer waits for a result's upload before naming this server's URL

_URL_FIELDS = {"upload": "uploadEndpoint", "webhook": "webhookURL"}


def finished_for(task_uuid: str, result_index: int, request: dict[str, Any], result: dict[str, Any],
                 path: Path) -> Finished:
    """What a sink needs of one stored result; its {filename} is the name the server serves it by."""
    return Finished(item_id=task_uuid, result_index=result_index, path=path,
                    filename=f"{result['imageUUID']}{path.suffix}", seed=result["seed"], task_uuid=task_uuid,
                    image_uuid=result["imageUUID"], output_type=request.get("outputType") or "URL",
                    upload_endpoint=request.get("uploadEndpoint"), webhook_url=request.get("webhookURL"),
                    cost=result.get("cost"), nsfw=result.get("NSFWContent"))


class ServeDeliveries(Dispatcher):
    """Sends each stored result's sinks in lanes and records every outcome in the store."""

    def __init__(self, store: Store, *, policy: RetryPolicy = DEFAULT_POLICY, per_destination: int = PER_DESTINATION,
                 per_key: int = PER_KEY, max_workers: int = MAX_WORKERS, upload_wait_s: float = UPLOAD_WAIT_S,
                 client=None, destinations: DestinationPolicy | None = None):
        super().__init__(None, "serve", policy=policy, max_workers=max_workers, client=client,
                         destinations=destinations, urls=SinkURLs(store.data_dir / FILE_NAME))
        self.store = store
        self.per_destination, self.per_key, self.upload_wait_s = per_destination, per_key, upload_wait_s
        self._lanes: Lanes | None = None
        self._alarms = _Alarms()
        self._lock = threading.Lock()  # delivery threads record outcomes; submitters start the lanes

    def check_destination(self, url: str) -> None:
        """ValueError when `url`'s host is a literal address (or localhost) the destination policy
        refuses: the task is refused at validation. Host names are checked when connecting."""
        check_url(url)
        problem = self.destinations.literal_problem(urlsplit(url).hostname or "")
        if problem:
            raise ValueError(problem)

    def first_states(self, finished: Finished) -> dict[str, str]:  # type: ignore[override]
        """{sink: state} to record with the result: `withheld` when the content check flagged it
        (as runs; a server never sends those), else `pending`. Keeps the URLs as given of a pending
        one first, for a resend after a restart."""
        state = "withheld" if finished.nsfw else "pending"
        if state == "pending":
            self.urls.keep([(finished.item_id, finished.result_index, finished.upload_endpoint, finished.webhook_url)])
        return {sink: state for sink in finished.sinks()}

    def send(self, finished: Finished, image_url: str | None, on_uploaded: Callable[[], None] | None = None,
             sinks: list[str] | None = None, owner: str | None = None) -> None:
        """Send the result's sinks (or only `sinks`) in the background, in the lanes of their
        destination and of `owner` (the key's digest). `image_url` is where this server serves the
        file (the webhook's imageURL when nothing was uploaded); `on_uploaded` runs once, when the
        upload sink is recorded or `upload_wait_s` after this call, whichever comes first (at once
        when there is no upload)."""
        sinks = [] if self.withholds(finished) else (sinks or finished.sinks())
        once = _Once(on_uploaded)
        if "upload" not in sinks:
            once()
        elif on_uploaded is not None:
            self._alarms.at(time.monotonic() + self.upload_wait_s, once)
        if not sinks:
            return
        first = finished.upload_url() if "upload" in sinks else finished.webhook_url
        limits: dict[Any, int] = {("destination", origin(first)): self.per_destination}
        if owner:
            limits[("key", owner)] = self.per_key
        with self._lock:
            if self._lanes is None:
                self._client = self._client or make_client(self._max_workers, self.destinations)
                self._lanes = Lanes(self._max_workers)
            self._lanes.submit(lambda: self._send(finished, sinks, image_url, once), limits)

    def resend_pending(self) -> int:
        """Send once more every sink a stopped server left `pending`; how many results that was. A
        sink whose URL as given is no longer kept, and whose stored URL lost its credentials, is
        recorded failed instead (sending it to the redacted URL would only be refused)."""
        by_result: dict[tuple[str, int], list[str]] = {}
        for row in self.store.deliveries(states=("pending",)):
            by_result.setdefault((row["taskUUID"], row["resultIndex"]), []).append(row["sink"])
        sent = 0
        for (task_uuid, index), sinks in by_result.items():
            record = self.store.task(task_uuid)
            result = next((r for r in (record or {}).get("results", []) if r["resultIndex"] == index), None)
            image = self.store.image(result["imageUUID"]) if result else None
            if record is None or result is None or image is None:
                continue
            request = dict(record["request"])
            kept = self.urls.get(task_uuid, index)
            if kept is not None:
                request["uploadEndpoint"], request["webhookURL"] = kept
            else:
                sinks = self._unsendable(record, index, sinks)
            if not sinks:
                continue
            finished = finished_for(task_uuid, index, request, result, image.path)
            base_url = request.get("baseURL")
            url = self.store.image_url(base_url, image) if base_url else None  # signed (flowgen.serve.urls)
            self.send(finished, url, sinks=[s for s in SINKS if s in sinks], owner=record.get("owner") or None)
            sent += 1
        return sent

    def _unsendable(self, record: dict, index: int, sinks: list[str]) -> list[str]:
        """Record failed the sinks whose stored URL was redacted (`request.redacted`); the rest."""
        redacted = record["request"].get("redacted", ())
        left = []
        for sink in sinks:
            field = _URL_FIELDS[sink]
            if field in redacted:
                self.store.set_delivery(record["taskUUID"], index, sink, "failed",
                                        target=record["request"].get(field), url=None, attempts=0,
                                        error=f"the server restarted without the {field} as given (its "
                                              "credentials are not stored); send the task again with a new taskUUID")
            else:
                left.append(sink)
        return left

    def close(self) -> None:
        """Wait for every delivery in flight or queued (each gives up within its retry policy)."""
        with self._lock:
            lanes, self._lanes = self._lanes, None
        if lanes is not None:
            lanes.close()
            self._client.close()
            self._client = None
        self._alarms.close()
        self.urls.close()

    # --- delivery threads --------------------------------------------------------------------

    def _send(self, finished: Finished, sinks: list[str], image_url: str | None,
              on_uploaded: Callable[[], None]) -> None:
        uploaded = None
        try:
            if "upload" in sinks:
                outcome = self._upload(finished)
                uploaded = outcome.url if outcome.state == "ok" else None
                self._record(finished, outcome)
            elif finished.upload_endpoint:  # a webhook resent alone still names the uploaded file
                uploaded = self.store_url(finished.item_id, finished.result_index)
        finally:
            on_uploaded()
        if "webhook" in sinks:  # a run's webhook names an unuploaded file by file://; a server's, by its URL
            self._record(finished, self._webhook(finished, uploaded or image_url))
        if not any(row["resultIndex"] == finished.result_index and row["state"] == "pending"
                   for row in self.store.deliveries(finished.item_id)):
            self.urls.forget(finished.item_id, finished.result_index)  # nothing left to resend

    def store_url(self, task_uuid: str, result_index: int) -> str | None:
        """Where the result's upload put it (no query string), or None while it is not uploaded."""
        for row in self.store.deliveries(task_uuid):
            if row["resultIndex"] == result_index and row["sink"] == "upload" and row["state"] == "ok":
                return row["url"]
        return None

    def _record(self, finished: Finished, outcome: _Outcome) -> None:
        attempts = outcome.delivery.attempts if outcome.delivery else []
        error = outcome.error or (None if outcome.state == "ok" else _last_error(outcome.delivery))
        self.store.set_delivery(finished.item_id, finished.result_index, outcome.sink, outcome.state,
                                target=outcome.target, url=outcome.url, error=error, attempts=len(attempts))
        with self._lock:
            self.counts[outcome.state] += 1


class _Once:
    """Calls `callback` the first time it is called, never again (None: nothing)."""

    def __init__(self, callback: Callable[[], None] | None):
        self._callback, self._lock = callback, threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class _Alarms:
    """Calls callbacks at given times, on one thread (started on first use), however many wait."""

    def __init__(self):
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def at(self, when: float, callback: Callable[[], None]) -> None:
        with self._wake:
            heapq.heappush(self._heap, (when, next(self._order), callback))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="flowgen-serve-alarms", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self) -> None:
        """Call what is still waiting now (the server is stopping), then stop."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._wake.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._closed and not self._heap:
                    return
                _, _, callback = heapq.heappop(self._heap)
            callback()
