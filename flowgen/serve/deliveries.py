"""webhookURL / uploadEndpoint for `flowgen serve`: the recipe runs' sinks, recorded in the server's store.

The sending is flowgen.run.deliver's Dispatcher (uploadEndpoint templated per result, PUT of the
file, then the spec's image result POSTed to webhookURL, signed from FLOWGEN_WEBHOOK_SECRET[_FILE],
retries, redacted URLs); only where outcomes are recorded differs: the store's `deliveries` table
instead of a run's manifest, written from the pool's threads as each sink finishes (the store
serialises its own writes), so the batcher's thread never waits for a receiver.

A result's sinks are recorded `pending` with the result itself (Store.add_result); a server
killed before they finished sends those once more when it starts again (`resend_pending`).
"""

from __future__ import annotations

import concurrent.futures as futures
import threading
from pathlib import Path
from typing import Any, Callable

from flowgen.delivery.http import DEFAULT_POLICY, RetryPolicy
from flowgen.delivery.pool import make_client
from flowgen.run.deliver import SINKS, Dispatcher, Finished, _last_error, _Outcome
from flowgen.serve.store import Store

MAX_WORKERS = 4


def finished_for(task_uuid: str, result_index: int, request: dict[str, Any], result: dict[str, Any],
                 path: Path) -> Finished:
    """What a sink needs of one stored result; its {filename} is the name the server serves it by."""
    return Finished(item_id=task_uuid, result_index=result_index, path=path,
                    filename=f"{result['imageUUID']}{path.suffix}", seed=result["seed"], task_uuid=task_uuid,
                    image_uuid=result["imageUUID"], output_type=request.get("outputType") or "URL",
                    upload_endpoint=request.get("uploadEndpoint"), webhook_url=request.get("webhookURL"),
                    cost=result.get("cost"), nsfw=result.get("NSFWContent"))


def first_states(finished: Finished) -> dict[str, str]:
    """{sink: state} to record with the result: `withheld` when the content check flagged it (as runs)."""
    state = "withheld" if finished.nsfw else "pending"
    return {sink: state for sink in finished.sinks()}


class ServeDeliveries(Dispatcher):
    """A bounded pool that sends each stored result's sinks and records every outcome in the store."""

    def __init__(self, store: Store, *, policy: RetryPolicy = DEFAULT_POLICY, max_workers: int = MAX_WORKERS,
                 client=None):
        super().__init__(None, "serve", policy=policy, max_workers=max_workers, client=client)
        self.store = store
        self._lock = threading.Lock()  # pool threads record outcomes; submitters start the pool

    def send(self, finished: Finished, image_url: str | None, on_uploaded: Callable[[], None] | None = None,
             sinks: list[str] | None = None) -> None:
        """Send the result's sinks (or only `sinks`) in the background. `image_url` is where this
        server serves the file (the webhook's imageURL when nothing was uploaded); `on_uploaded`
        runs once the upload sink is recorded (at once when there is none)."""
        sinks = [] if self.withholds(finished) else (sinks or finished.sinks())
        if "upload" not in sinks and on_uploaded is not None:
            on_uploaded()
            on_uploaded = None
        if not sinks:
            return
        with self._lock:
            if self._pool is None:
                self._client = self._client or make_client(self._max_workers)
                self._pool = futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="flowgen-serve-deliver")
            self._pool.submit(self._send, finished, sinks, image_url, on_uploaded)

    def resend_pending(self) -> int:
        """Send once more every sink a stopped server left `pending`; how many results that was."""
        by_result: dict[tuple[str, int], list[str]] = {}
        for row in self.store.deliveries(states=("pending",)):
            by_result.setdefault((row["taskUUID"], row["resultIndex"]), []).append(row["sink"])
        sent = 0
        for (task_uuid, index), sinks in by_result.items():
            record = self.store.task(task_uuid)
            result = next((r for r in (record or {}).get("results", []) if r["resultIndex"] == index), None)
            image = self.store.image(result["imageUUID"]) if result else None
            if image is None:
                continue
            finished = finished_for(task_uuid, index, record["request"], result, image.path)
            base_url = record["request"].get("baseURL")
            url = self.store.image_url(base_url, image) if base_url else None  # signed (flowgen.serve.urls)
            self.send(finished, url, sinks=[s for s in SINKS if s in sinks])
            sent += 1
        return sent

    def close(self) -> None:
        """Wait for every delivery in flight (each gives up within its retry policy)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._client.close()
            self._pool, self._client = None, None

    # --- pool threads ------------------------------------------------------------------------

    def _send(self, finished: Finished, sinks: list[str], image_url: str | None,
              on_uploaded: Callable[[], None] | None) -> None:
        uploaded = None
        try:
            if "upload" in sinks:
                outcome = self._upload(finished)
                uploaded = outcome.url if outcome.state == "ok" else None
                self._record(finished, outcome)
            elif finished.upload_endpoint:  # a webhook resent alone still names the uploaded file
                uploaded = self.store_url(finished.item_id, finished.result_index)
        finally:
            if on_uploaded is not None:
                on_uploaded()
        if "webhook" in sinks:  # a run's webhook names an unuploaded file by file://; a server's, by its URL
            self._record(finished, self._webhook(finished, uploaded or image_url))

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
