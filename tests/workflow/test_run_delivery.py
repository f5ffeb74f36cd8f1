"""Runs that deliver: webhooks and uploads on real loopback servers, retries, redelivery, kill -9
during delivery, content-check withholding, cost and budget."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from werkzeug import Response

from flowgen.delivery.http import RetryPolicy
from flowgen.delivery.webhook import SIGNATURE_HEADER, verify_signature
from flowgen.run.deliver import resend
from flowgen.run.engine import BatchOutput, FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.manifest import Manifest
from tests.workflow.direct_runs import FAST, deliveries, item, plan_of


@pytest.fixture
def threaded_server():
    """An HTTP server that answers requests concurrently (a slow answer must not queue the retry)."""
    from pytest_httpserver import HTTPServer

    server = HTTPServer(host="127.0.0.1", threaded=True)
    server.start()
    yield server
    server.clear()
    server.stop()


def received(server) -> list[dict]:
    return [json.loads(request.get_data()) for request, _ in server.log]


def test_each_result_posts_one_signed_webhook_shaped_like_the_spec(tmp_path, httpserver, monkeypatch):
    monkeypatch.setenv("FLOWGEN_WEBHOOK_SECRET", "s3cret")
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    out = tmp_path / "out"
    items = [item(f"k{i}", webhookURL=httpserver.url_for("/hook"), includeCost=True, numberResults=2) for i in range(2)]
    summary = execute(against_folder(plan_of(items, out)), FakeEngine(delay_per_image=0.01), delivery_options=FAST)
    assert summary.rendered == 4 and summary.deliveries == {"ok": 4, "failed": 0, "withheld": 0}
    bodies = []
    for request, _ in httpserver.log:
        assert verify_signature(request.get_data(), request.headers[SIGNATURE_HEADER], b"s3cret")
        assert not verify_signature(request.get_data(), request.headers[SIGNATURE_HEADER], b"other")
        bodies.append(json.loads(request.get_data()))
    with Manifest(out) as manifest:
        records = {r["imageUUID"]: r for r in manifest.records()}
    assert sorted(b["imageUUID"] for b in bodies) == sorted(records)  # one POST per result
    for body in bodies:
        record = records[body["imageUUID"]]
        assert set(body) == {"taskType", "taskUUID", "imageUUID", "imageURL", "seed", "cost"}
        assert body["taskType"] == "imageInference" and body["taskUUID"] == record["taskUUID"]
        assert body["seed"] == record["seed"] and body["cost"] == record["cost"] > 0
        assert body["imageURL"] == (out / record["output"]["path"]).resolve().as_uri()
    assert all(d["state"] == "ok" and d["attempts"] == 1 for d in deliveries(out).values())
    # stable ids: a forced re-render keeps taskUUID (derived from the item) for the same item
    task_uuids = {r["item_id"]: r["taskUUID"] for r in records.values()}
    assert len(set(task_uuids.values())) == 2


def test_base64_and_data_uri_payloads_carry_the_file_bytes(tmp_path, httpserver):
    httpserver.expect_request("/hook").respond_with_data("ok")
    out = tmp_path / "out"
    items = [item("b64", webhookURL=httpserver.url_for("/hook"), outputType="base64Data"),
             item("uri", webhookURL=httpserver.url_for("/hook"), outputType="dataURI", outputFormat="WEBP")]
    execute(against_folder(plan_of(items, out)), FakeEngine(), delivery_options=FAST)
    with Manifest(out) as manifest:
        files = {r["imageUUID"]: (out / r["output"]["path"]).read_bytes() for r in manifest.records()}
    bodies = {b["imageUUID"]: b for b in received(httpserver)}
    kinds = set()
    for uuid, body in bodies.items():
        if "imageBase64Data" in body:
            kinds.add("b64")
            assert base64.b64decode(body["imageBase64Data"]) == files[uuid]
        else:
            kinds.add("uri")
            head, data = body["imageDataURI"].split(",", 1)
            assert head == "data:image/webp;base64" and base64.b64decode(data) == files[uuid]
    assert kinds == {"b64", "uri"}
    # the manifest export carries the same forms
    rows = {json.loads(line)["imageUUID"]: json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()}
    for uuid, body in bodies.items():
        key = "imageBase64Data" if "imageBase64Data" in body else "imageDataURI"
        assert rows[uuid][key] == body[key]


def test_a_failing_webhook_is_retried_given_up_recorded_and_redelivered(tmp_path, httpserver):
    out = tmp_path / "out"
    httpserver.expect_request("/hook").respond_with_data("down", status=503)
    items = [item(f"k{i}", webhookURL=httpserver.url_for("/hook")) for i in range(2)]
    summary = execute(against_folder(plan_of(items, out)), FakeEngine(), delivery_options=FAST)
    assert summary.deliveries["failed"] == 2 and len(httpserver.log) == 6  # 3 attempts each
    state = deliveries(out)
    assert all(d["state"] == "failed" and d["attempts"] == 3 and "503" in d["error"] for d in state.values())
    with Manifest(out) as manifest:
        first = next(iter(state.values()))
        outcomes = [a["outcome"] for a in manifest.attempts(first["item_id"], first["result_index"])]
    assert outcomes == ["retry", "retry", "gave_up"]

    # a rerun renders nothing and does not resend what gave up; redeliver sends exactly that
    httpserver.clear()
    httpserver.expect_request("/hook").respond_with_data("ok")
    again = execute(against_folder(plan_of(items, out)), FakeEngine(), delivery_options=FAST)
    assert again.rendered == 0 and len(httpserver.log) == 0
    with Manifest(out) as manifest:
        counts = resend(manifest, "redeliver-1", out, ("failed",), **FAST)
    assert counts["ok"] == 2 and len(httpserver.log) == 2
    assert all(d["state"] == "ok" and d["attempts"] == 4 for d in deliveries(out).values())
    with Manifest(out) as manifest:
        assert resend(manifest, "redeliver-2", out, ("failed",), **FAST)["ok"] == 0  # nothing left


def test_a_timeout_is_retried(tmp_path, threaded_server):
    httpserver = threaded_server
    calls = []

    def slow_then_fine(request):
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(1.0)
        return Response("ok")

    httpserver.expect_request("/hook").respond_with_handler(slow_then_fine)
    out = tmp_path / "out"
    policy = {"policy": RetryPolicy(max_attempts=3, base_delay_s=0.0, timeout_s=0.3, sleep=lambda s: None)}
    execute(against_folder(plan_of([item("k0", webhookURL=httpserver.url_for("/hook"))], out)), FakeEngine(), delivery_options=policy)
    (state,) = deliveries(out).values()
    assert state["state"] == "ok" and state["attempts"] == 2


def test_upload_to_an_s3_emulator_through_a_presigned_url_reads_back_identical(tmp_path, httpserver, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        s3.create_bucket(Bucket="shop")
        url = s3.generate_presigned_url("put_object", Params={"Bucket": "shop", "Key": "sku/a.png", "ContentType": "image/png"},
                                        ExpiresIn=600)
        httpserver.expect_request("/hook").respond_with_data("ok")
        out = tmp_path / "out"
        items = [item("a", uploadEndpoint=url, webhookURL=httpserver.url_for("/hook"))]
        summary = execute(against_folder(plan_of(items, out)), FakeEngine(), delivery_options=FAST)
        assert summary.deliveries["ok"] == 2
        with Manifest(out) as manifest:
            (record,) = manifest.records()
        stored = s3.get_object(Bucket="shop", Key="sku/a.png")
        assert stored["Body"].read() == (out / record["output"]["path"]).read_bytes()
        assert stored["ContentType"] == "image/png"
        state = deliveries(out)
        upload = state[(record["item_id"], 0, "upload")]
        assert upload["url"] == f"http://{host}:{port}/shop/sku/a.png" and "Signature" not in (upload["target"] or "")
        (body,) = received(httpserver)
        assert body["imageURL"] == upload["url"]  # the webhook names the uploaded file, not the local one
        (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert row["imageURL"] == upload["url"] and row["delivery"]["upload"]["state"] == "ok"
    finally:
        server.stop()


KILLED_DURING_DELIVERY = textwrap.dedent("""
    import sys
    from flowgen.delivery.http import RetryPolicy
    from flowgen.run.engine import FakeEngine
    from flowgen.run.executor import against_folder, execute
    from tests.workflow.direct_runs import item, plan_of
    out, url = sys.argv[1], sys.argv[2]
    items = [item(f"k{i}", webhookURL=url) for i in range(3)]
    execute(against_folder(plan_of(items, out)), FakeEngine(), delivery_options={"policy": RetryPolicy(timeout_s=60)})
""")


def test_kill_9_during_delivery_then_a_rerun_delivers_each_result_at_most_once_more(tmp_path, threaded_server):
    httpserver = threaded_server
    arrived, release = threading.Event(), threading.Event()

    def hang(request):  # the first POSTs arrive and never get an answer before the kill
        arrived.set()
        release.wait(30)
        return Response("ok")

    httpserver.expect_request("/hook").respond_with_handler(hang)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_DURING_DELIVERY, str(out), httpserver.url_for("/hook")],
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert arrived.wait(120), "the run never started delivering"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        release.set()
    state = deliveries(out)
    assert len(state) == 3 and {d["state"] for d in state.values()} == {"pending"}  # recorded before sending

    httpserver.clear()
    httpserver.expect_request("/hook").respond_with_data("ok")
    summary = execute(against_folder(plan_of([item(f"k{i}", webhookURL=httpserver.url_for("/hook")) for i in range(3)], out)),
                      FakeEngine(), delivery_options=FAST)
    assert summary.rendered == 0 and summary.died_runs  # nothing rendered twice; the dead run named
    bodies = received(httpserver)
    assert len(bodies) == 3 and len({b["imageUUID"] for b in bodies}) == 3  # each once more, no more
    assert all(d["state"] == "ok" for d in deliveries(out).values())
    with Manifest(out) as manifest:
        runs = [a["run_id"] for a in manifest.attempts(*next(iter(state))[:2])]
    assert runs == [summary.run_id]  # the killed run's attempt never finished, so it is not recorded


class PhotoEngine(FakeEngine):
    """Returns a real photo (skimage's astronaut) for every row: something a detector can see."""

    def generate_batch(self, request):
        data = pytest.importorskip("skimage.data")
        from PIL import Image

        photo = np.asarray(Image.fromarray(data.astronaut()).resize((request.width, request.height)))
        output = super().generate_batch(request)
        return BatchOutput([photo.copy() for _ in output.images], output.timings, output.layouts)


def test_the_content_check_verdict_is_recorded_and_a_flag_withholds_delivery(tmp_path, httpserver, monkeypatch):
    pytest.importorskip("nudenet")
    from flowgen import safety

    httpserver.expect_request("/hook").respond_with_data("ok")
    hook = httpserver.url_for("/hook")
    out = tmp_path / "clean"
    summary = execute(against_folder(plan_of([item("a", width=256, height=256, webhookURL=hook, safety={"checkContent": True})], out)),
                      PhotoEngine(), delivery_options=FAST)
    with Manifest(out) as manifest:
        (record,) = manifest.records()
    assert record["NSFWContent"] is False and summary.flagged == 0
    assert any(d["label"].startswith("FACE_") for d in record["safety"]["detections"])  # the detector really ran
    (body,) = received(httpserver)
    assert body["NSFWContent"] is False

    # forced flag: count faces as explicit, low threshold
    monkeypatch.setattr(safety, "EXPLICIT_LABELS", frozenset({"FACE_FEMALE", "FACE_MALE"}))
    httpserver.clear()
    httpserver.expect_request("/hook").respond_with_data("ok")
    out = tmp_path / "flagged"
    summary = execute(against_folder(plan_of([item("a", width=256, height=256, webhookURL=hook, safety={"checkContent": True})], out)),
                      PhotoEngine(), delivery_options=FAST)
    with Manifest(out) as manifest:
        (record,) = manifest.records()
    assert record["NSFWContent"] is True and summary.flagged == 1 and (out / record["output"]["path"]).exists()
    assert len(httpserver.log) == 0 and {d["state"] for d in deliveries(out).values()} == {"withheld"}
    with Manifest(out) as manifest:  # redeliver leaves withheld results alone unless asked
        assert resend(manifest, "r", out, ("failed", "pending"), **FAST)["ok"] == 0
        assert resend(manifest, "r", out, ("withheld",), deliver_flagged=True, **FAST)["ok"] == 1
    (body,) = received(httpserver)
    assert body["NSFWContent"] is True


def test_a_budget_stops_the_run_before_a_batch_that_would_exceed_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGEN_COST_PER_DEVICE_SECOND", "1.0")  # one dollar per engine-second
    out = tmp_path / "out"
    items = [item(f"k{i}") for i in range(12)]  # 3 batches of 4
    engine = FakeEngine(delay_per_image=0.05)  # ≈ 0.2 s = $0.20 per batch
    summary = execute(against_folder(plan_of(items, out, max_batch=4)), engine, budget=0.3)
    assert summary.budget_stopped and summary.rendered == 4 and summary.not_run == 8
    assert 0.15 < summary.spent <= 0.3
