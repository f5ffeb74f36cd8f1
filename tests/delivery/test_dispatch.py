"""The one dispatcher and the one delivery log that `flowgen run` and `flowgen serve` share
(flowgen.delivery.dispatch, flowgen.delivery.log): the same table shape in a run's manifest and in the
server's store, outcomes recorded on the thread the log allows, URLs as given kept exactly as long as
something may still be sent, and a webhook resent alone naming the file its upload put."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from werkzeug import Response

from flowgen.delivery.dispatch import FLAGGED, Dispatcher, Finished
from flowgen.delivery.http import RetryPolicy
from flowgen.delivery.log import DeliveryTable, SinkOutcome, SinkState
from flowgen.delivery.sink_urls import SinkURLs
from flowgen.run.manifest import Manifest, manifest_path
from flowgen.serve.store import Store

FAST = RetryPolicy(max_attempts=2, base_delay_s=0.0, timeout_s=2.0, sleep=lambda s: None)


def columns(db: Path, table: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return [row[1:] for row in conn.execute(f"PRAGMA table_info({table})")]  # name, type, notnull, default, pk


def test_a_runs_manifest_and_the_servers_store_keep_one_deliveries_table_shape(tmp_path):
    with Manifest(tmp_path / "out"):
        pass
    Store(tmp_path / "data").close()
    for table in ("deliveries", "delivery_attempts"):
        ours = columns(manifest_path(tmp_path / "out"), table)
        assert ours and ours == columns(tmp_path / "data" / "serve.sqlite", table)


def test_a_store_written_with_the_servers_old_deliveries_table_keeps_its_rows_in_the_shared_shape(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "serve.sqlite") as conn:  # the table as the server kept it before
        conn.execute("CREATE TABLE deliveries (task_uuid TEXT NOT NULL, result_index INTEGER NOT NULL, sink TEXT NOT "
                     "NULL, state TEXT NOT NULL, target TEXT, url TEXT, attempts INTEGER NOT NULL DEFAULT 0, error TEXT, "
                     "updated REAL NOT NULL, PRIMARY KEY (task_uuid, result_index, sink))")
        conn.execute("INSERT INTO deliveries VALUES ('t-1', 0, 'upload', 'ok', 'https://b.example/x.png', "
                     "'https://b.example/x.png', 2, NULL, 1.5)")
        conn.execute("INSERT INTO deliveries VALUES ('t-1', 0, 'webhook', 'pending', NULL, NULL, 0, NULL, 1.5)")
    store = Store(data)
    rows = store.deliveries("t-1")
    store.close()
    assert [(r["item_id"], r["result_index"], r["sink"], r["state"], r["url"], r["attempts"], r["updated_at"])
            for r in rows] == [("t-1", 0, "upload", "ok", "https://b.example/x.png", 2, 1.5),
                               ("t-1", 0, "webhook", "pending", None, 0, 1.5)]
    with Manifest(tmp_path / "out"):
        pass
    assert columns(data / "serve.sqlite", "deliveries") == columns(manifest_path(tmp_path / "out"), "deliveries")


class Log:
    """A DeliveryLog over a DeliveryTable in memory, noting the thread each outcome was recorded on."""

    def __init__(self, thread_safe: bool):
        self.thread_safe = thread_safe
        self.table = DeliveryTable(sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None))
        self.table.create()
        self.threads: list[str] = []
        self.lock = threading.Lock()

    def record_delivery(self, outcome: SinkOutcome, run_id: str) -> None:
        with self.lock:
            self.threads.append(threading.current_thread().name)
            self.table.record(outcome, run_id)

    def rows(self) -> dict[str, dict]:
        with self.lock:
            return {row["sink"]: row for row in self.table.rows()}


def finished(tmp_path: Path, upload: str | None, webhook: str | None, nsfw: bool | None = None) -> Finished:
    path = tmp_path / "img.png"
    path.write_bytes(b"\x89PNG fake bytes")
    return Finished(item_id="item-1", result_index=0, path=path, filename="img.png", seed=7, task_uuid="task-1",
                    image_uuid="image-1", output_type="URL", upload_endpoint=upload, webhook_url=webhook, nsfw=nsfw,
                    image_url="https://server.example/v1/images/image-1.png")


def dispatcher(log: Log, tmp_path: Path, redeliverable: bool) -> Dispatcher:
    return Dispatcher(log, SinkURLs(tmp_path / "sink-urls.sqlite"), run_id="r1", policy=FAST, redeliverable=redeliverable)


def test_a_thread_safe_log_records_the_upload_before_its_callback_and_the_rest_on_the_delivery_threads(
        tmp_path, httpserver):
    httpserver.expect_request("/bucket/img.png", method="PUT").respond_with_data("")
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    log = Log(thread_safe=True)
    sending = dispatcher(log, tmp_path, redeliverable=False)
    result = finished(tmp_path, httpserver.url_for("/bucket/") + "{filename}?sig=SECRET", httpserver.url_for("/hook"))
    log.table.add_first_states(sending.first_states([result]))
    seen_at_upload: list[dict] = []
    sending.submit(result, on_uploaded=lambda: seen_at_upload.append(log.rows()["upload"]))
    sending.close()
    assert [row["state"] for row in seen_at_upload] == ["ok"]  # recorded before the callback ran
    rows = log.rows()
    assert {sink: (row["state"], row["attempts"]) for sink, row in rows.items()} == {"upload": ("ok", 1),
                                                                                   "webhook": ("ok", 1)}
    assert rows["upload"]["url"] == httpserver.url_for("/bucket/img.png")  # no query string
    assert all(name != threading.current_thread().name for name in log.threads)
    assert SinkURLs(tmp_path / "sink-urls.sqlite").get("item-1", 0) is None  # all sent: forgotten


def test_a_log_that_is_not_thread_safe_is_written_only_by_its_owners_thread(tmp_path, httpserver):
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    log = Log(thread_safe=False)
    sending = dispatcher(log, tmp_path, redeliverable=True)
    result = finished(tmp_path, None, httpserver.url_for("/hook"))
    log.table.add_first_states(sending.first_states([result]))
    sending.submit(result)
    sending.close()  # waits, then records on this thread
    assert log.threads == [threading.current_thread().name]
    assert log.rows()["webhook"]["state"] == "ok" and sending.counts == {"ok": 1, "failed": 0, "withheld": 0}


@pytest.mark.parametrize("redeliverable", [True, False])
def test_a_failed_sinks_urls_as_given_are_kept_only_where_it_may_be_sent_again(tmp_path, httpserver, redeliverable):
    httpserver.expect_request("/hook", method="POST").respond_with_data("no", status=500)
    log = Log(thread_safe=True)
    sending = dispatcher(log, tmp_path, redeliverable)
    hook = httpserver.url_for("/hook") + "?token=SECRET"
    result = finished(tmp_path, None, hook)
    log.table.add_first_states(sending.first_states([result]))
    sending.submit(result)
    sending.close()
    assert (log.rows()["webhook"]["state"], log.rows()["webhook"]["error"]) == ("failed", "HTTP 500 INTERNAL SERVER ERROR")
    kept = SinkURLs(tmp_path / "sink-urls.sqlite").get("item-1", 0)
    assert kept == ((None, hook) if redeliverable else None)  # a run's `flowgen redeliver` needs it; a server never resends


@pytest.mark.parametrize("redeliverable", [True, False])
def test_a_flagged_result_is_withheld_and_its_urls_kept_only_for_a_later_redeliver(tmp_path, redeliverable):
    log = Log(thread_safe=True)
    sending = dispatcher(log, tmp_path, redeliverable)
    result = finished(tmp_path, "https://bucket.example/x.png?sig=S", "https://hooks.example/h", nsfw=True)
    assert sending.first_states([result]) == [SinkState("item-1", 0, "upload", "withheld", FLAGGED),
                                              SinkState("item-1", 0, "webhook", "withheld", FLAGGED)]
    called = []
    sending.submit(result, on_uploaded=lambda: called.append(1))
    sending.close()
    assert called == [1] and log.threads == []  # nothing sent, and the answer is not held
    kept = SinkURLs(tmp_path / "sink-urls.sqlite").get("item-1", 0)
    assert kept == (("https://bucket.example/x.png?sig=S", "https://hooks.example/h") if redeliverable else None)


def test_a_webhook_resent_alone_names_the_file_its_earlier_upload_put(tmp_path, httpserver):
    bodies = []
    httpserver.expect_request("/hook", method="POST").respond_with_handler(
        lambda request: bodies.append(request.get_json()) or Response("ok"))
    log = Log(thread_safe=True)
    sending = dispatcher(log, tmp_path, redeliverable=True)
    result = finished(tmp_path, "https://bucket.example/up/", httpserver.url_for("/hook"))
    log.table.add_first_states([SinkState("item-1", 0, "webhook", "failed")])
    log.table.set_state("item-1", 0, "upload", "ok", target="https://bucket.example/up/img.png",
                        url="https://bucket.example/up/img.png", attempts=1)
    asked = []
    count = sending.resend(log.table.rows(), ("failed",), lambda rid, sinks: asked.append((rid, sinks)) or (result, sinks))
    sending.close()
    assert count == 1 and asked == [(("item-1", 0), ["webhook"])]
    assert [body["imageURL"] for body in bodies] == ["https://bucket.example/up/img.png"]
    assert log.rows()["webhook"]["state"] == "ok" and log.rows()["upload"]["attempts"] == 1  # not uploaded again
