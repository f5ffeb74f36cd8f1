"""webhookURL / uploadEndpoint for `flowgen serve`: the runs' dispatcher (flowgen.delivery.dispatch),
recorded in the server's store, with what is the server's own: its answers and its restarts.

The sending is the one Dispatcher that runs use too (uploadEndpoint templated per result, PUT of
the file, then the spec's image result POSTed to webhookURL, signed, retried, redacted,
destinations checked), in lanes: at most PER_DESTINATION at once to one destination and PER_KEY
at once for one API key (a result's `owner`), MAX_WORKERS in all. Outcomes are recorded in the
store's deliveries table (the run manifest's shape, flowgen.delivery.log) from the delivery
threads as each sink finishes (the store serialises its own writes), so the batcher's thread
never waits for a receiver.

What is the server's: a task's answer does not wait for a slow sink. It waits for a result's
upload at most `upload_wait_s` (then the answer's imageURL is this server's URL, and getResponse
names the uploaded one once the upload is recorded: `store_url`). A server killed before a
result's sinks finished sends those once more when it starts again (`resend_pending`); the URLs
as given live in DATA_DIR/sink-urls.sqlite (0600) only while a sink is pending (a server never
resends a failed or withheld sink).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowgen.delivery.dispatch import PER_DESTINATION, PER_KEY, Dispatcher, Finished
from flowgen.delivery.http import DEFAULT_POLICY, RetryPolicy
from flowgen.delivery.log import SinkState
from flowgen.delivery.sink_urls import FILE_NAME, SinkURLs
from flowgen.net.policy import DestinationPolicy
from flowgen.serve.store import Store

MAX_WORKERS = 64  # delivery threads in all (started as needed)
UPLOAD_WAIT_S = 5.0  # how long a task's answer waits for a result's upload before naming this server's URL

_URL_FIELDS = {"upload": "uploadEndpoint", "webhook": "webhookURL"}


def finished_for(
    task_uuid: str,
    result_index: int,
    request: dict[str, Any],
    result: dict[str, Any],
    path: Path,
    image_url: str | None,
    owner: str | None,
) -> Finished:
    """What a sink needs of one stored result; its {filename} is the name the server serves it by,
    `image_url` where it serves it (a webhook's imageURL when nothing was uploaded)."""
    return Finished(
        item_id=task_uuid,
        result_index=result_index,
        path=path,
        filename=f"{result['imageUUID']}{path.suffix}",
        seed=result["seed"],
        task_uuid=task_uuid,
        image_uuid=result["imageUUID"],
        output_type=request.get("outputType") or "URL",
        upload_endpoint=request.get("uploadEndpoint"),
        webhook_url=request.get("webhookURL"),
        cost=result.get("cost"),
        nsfw=result.get("NSFWContent"),
        image_url=image_url,
        owner=owner or None,
    )


class ServeDeliveries:
    """The server's dispatcher over its store, and the waits and resends that are the server's (see module doc)."""

    def __init__(
        self,
        store: Store,
        *,
        policy: RetryPolicy = DEFAULT_POLICY,
        max_workers: int = MAX_WORKERS,
        per_destination: int = PER_DESTINATION,
        per_key: int = PER_KEY,
        upload_wait_s: float = UPLOAD_WAIT_S,
        client=None,
        destinations: DestinationPolicy | None = None,
    ):
        self.store = store
        self.dispatcher = Dispatcher(
            store,
            SinkURLs(store.data_dir / FILE_NAME),
            run_id="serve",
            policy=policy,
            max_workers=max_workers,
            per_destination=per_destination,
            per_key=per_key,
            redeliverable=False,
            client=client,
            destinations=destinations,
        )
        self.upload_wait_s = upload_wait_s
        self._alarms = _Alarms()

    @property
    def policy(self) -> RetryPolicy:
        return self.dispatcher.policy

    @policy.setter
    def policy(self, policy: RetryPolicy) -> None:
        self.dispatcher.policy = policy

    def check_destination(self, url: str) -> None:
        """ValueError for a URL the task is refused for at validation (Dispatcher.check_destination)."""
        self.dispatcher.check_destination(url)

    def first_states(self, finished: Finished) -> list[SinkState]:
        """The result's sinks' first states, to record with it (Store.add_result): `pending`, or
        `withheld` when the content check flagged it (a server never sends those)."""
        return self.dispatcher.first_states([finished])

    def send(
        self,
        finished: Finished,
        on_uploaded: Callable[[], None] | None = None,
        sinks: list[str] | None = None,
        uploaded_url: str | None = None,
    ) -> None:
        """Send the result's sinks (or only `sinks`) in the background. `on_uploaded` runs once, when
        the upload sink is recorded or `upload_wait_s` after this call, whichever comes first (at
        once when there is no upload)."""
        once = _Once(on_uploaded)
        if on_uploaded is not None and "upload" in (sinks or finished.sinks()):
            self._alarms.at(time.monotonic() + self.upload_wait_s, once)
        self.dispatcher.submit(finished, sinks, uploaded_url=uploaded_url, on_uploaded=once)

    def resend_pending(self) -> int:
        """Send once more every sink a stopped server left `pending`; how many results that was. A
        sink whose URL as given is no longer kept, and whose stored URL lost its credentials, is
        recorded failed instead (sending it to the redacted URL would only be refused)."""
        return self.dispatcher.resend(self.store.deliveries(), ("pending",), self._stored_result)

    def _stored_result(self, rid: tuple[str, int], sinks: list[str]) -> tuple[Finished, list[str]] | None:
        task_uuid, index = rid
        record = self.store.task(task_uuid)
        result = next((r for r in (record or {}).get("results", []) if r["resultIndex"] == index), None)
        image = self.store.image(result["imageUUID"]) if result else None
        if record is None or result is None or image is None:
            return None
        request = dict(record["request"])
        kept = self.dispatcher.urls.get(task_uuid, index)
        if kept is not None:
            request["uploadEndpoint"], request["webhookURL"] = kept
        else:
            sinks = self._unsendable(record, index, sinks)
        base_url = request.get("baseURL")
        url = self.store.image_url(base_url, image) if base_url else None  # signed (flowgen.serve.urls)
        return finished_for(task_uuid, index, request, result, image.path, url, record.get("owner")), sinks

    def _unsendable(self, record: dict, index: int, sinks: list[str]) -> list[str]:
        """Record failed the sinks whose stored URL was redacted (`request.redacted`); the rest."""
        redacted = record["request"].get("redacted", ())
        left = []
        for sink in sinks:
            field = _URL_FIELDS[sink]
            if field in redacted:
                self.store.set_delivery(
                    record["taskUUID"],
                    index,
                    sink,
                    "failed",
                    target=record["request"].get(field),
                    error=f"the server restarted without the {field} as given (its "
                    "credentials are not stored); send the task again with a new taskUUID",
                )
            else:
                left.append(sink)
        return left

    def store_url(self, task_uuid: str, result_index: int) -> str | None:
        """Where the result's upload put it (no query string), or None while it is not uploaded."""
        for row in self.store.deliveries(task_uuid):
            if row["result_index"] == result_index and row["sink"] == "upload" and row["state"] == "ok":
                return row["url"]
        return None

    def close(self) -> None:
        """Wait for every delivery in flight or queued (each gives up within its retry policy)."""
        self.dispatcher.close()
        self._alarms.close()


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
