"""`flowgen serve` with what runs do after rendering: webhookURL and uploadEndpoint (the runs'
sinks, recorded in the server's store), LoRAs (their own batches) and the face pass.

Receivers are pytest-httpserver on loopback; the engine is FakeEngine behind the real batcher.
"""

from __future__ import annotations

import base64
import json
import time
import uuid

import numpy as np
import pytest
from pytest_httpserver import URIPattern
from safetensors.numpy import save_file
from starlette.testclient import TestClient
from werkzeug import Response

from flowgen.delivery.http import RetryPolicy
from flowgen.delivery.log import SinkState
from flowgen.delivery.webhook import SIGNATURE_HEADER, verify_signature
from flowgen.run.engine import FakeEngine
from flowgen.serve.app import create_app
from flowgen.serve.auth import key_digest
from flowgen.serve.batcher import Batcher
from flowgen.serve.store import Store
from tests.serve.fake_app import AUTH, KEY, decode, expected_pixels, task, tiny_card

FAST = RetryPolicy(max_attempts=3, base_delay_s=0.0, timeout_s=2.0, sleep=lambda s: None)


def make_app(data_dir, engine=None, window_s=0.01):
    engine = engine or FakeEngine()
    batcher = Batcher(lambda name: engine, window_s=window_s, max_batch=4)
    app = create_app(batcher=batcher, data_dir=data_dir, models=[tiny_card()], keys=frozenset({KEY}))
    app.state.server.service.deliveries.policy = FAST
    return app


def send(client, *tasks):
    response = client.post("/v1", json=list(tasks), headers=AUTH)
    return response.json()


def settled(app, task_uuid, timeout=10.0):
    """The task's delivery rows once none is pending any more."""
    store = app.state.server.service.store
    deadline = time.monotonic() + timeout
    while True:
        rows = store.deliveries(task_uuid)
        if rows and all(row["state"] != "pending" for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


# --- webhookURL / uploadEndpoint --------------------------------------------------------------------


def test_each_result_posts_one_signed_webhook_shaped_like_the_spec(tmp_path, httpserver, monkeypatch):
    monkeypatch.setenv("FLOWGEN_WEBHOOK_SECRET", "s3cret")
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    app = make_app(tmp_path / "data")
    with TestClient(app, base_url="http://testserver") as client:
        t = task(webhookURL=httpserver.url_for("/hook"), numberResults=2, includeCost=True)
        answer = send(client, t)["data"]
        rows = settled(app, t["taskUUID"])
    assert [(r["sink"], r["state"], r["attempts"]) for r in rows] == [("webhook", "ok", 1)] * 2
    bodies = {}
    for request, _ in httpserver.log:
        assert verify_signature(request.get_data(), request.headers[SIGNATURE_HEADER], b"s3cret")
        body = json.loads(request.get_data())
        bodies[body["imageUUID"]] = body
    assert len(bodies) == 2
    for item in answer:  # the webhook carries what the sync answer says, imageURL included
        body = bodies[item["imageUUID"]]
        assert set(body) == {"taskType", "taskUUID", "imageUUID", "imageURL", "seed", "cost"}
        assert (body["taskType"], body["taskUUID"]) == ("imageInference", t["taskUUID"])
        assert (body["imageURL"], body["seed"], body["cost"]) == (item["imageURL"], item["seed"], item["cost"])


def test_uploads_are_byte_identical_and_the_answer_names_the_uploaded_url(tmp_path, httpserver):
    received: dict[str, bytes] = {}

    def store_put(request):
        received[request.path] = request.get_data()
        ok = request.args.get("X-Amz-Signature") == "abc"  # the presigned query is sent as given
        return Response("", status=200 if ok else 403)

    httpserver.expect_request(_Prefix("/bucket/"), method="PUT").respond_with_handler(store_put)
    app = make_app(tmp_path / "data")
    t = task(numberResults=2, outputFormat="PNG",
             uploadEndpoint=httpserver.url_for("/bucket/") + "{imageUUID}.png?X-Amz-Signature=abc")
    with TestClient(app, base_url="http://testserver") as client:
        answer = send(client, t)["data"]
        rows = settled(app, t["taskUUID"])
        served = {item["imageUUID"]: client.get(f"/v1/images/{item['imageUUID']}.png", headers=AUTH).content
                  for item in answer}
    assert [(r["sink"], r["state"]) for r in rows] == [("upload", "ok")] * 2
    assert len(received) == 2
    for item in answer:
        path = f"/bucket/{item['imageUUID']}.png"
        assert received[path] == served[item["imageUUID"]]  # byte-identical to what the server stores
        assert item["imageURL"] == httpserver.url_for(path)  # the uploaded URL, query string removed


def test_a_failing_webhook_is_retried_then_recorded_failed_and_the_task_still_succeeds(tmp_path, httpserver):
    httpserver.expect_request("/hook").respond_with_data("down", status=503)
    app = make_app(tmp_path / "data")
    with TestClient(app, base_url="http://testserver") as client:
        t = task(webhookURL=httpserver.url_for("/hook"))
        answer = send(client, t)
        rows = settled(app, t["taskUUID"])
        polled = client.post("/v1", json=[{"taskType": "getResponse", "taskUUID": t["taskUUID"]}],
                             headers=AUTH).json()
    assert "errors" not in answer and polled["data"][0]["status"] == "success"
    assert len(httpserver.log) == 3  # FAST: 3 attempts
    (row,) = rows
    assert (row["sink"], row["state"], row["attempts"]) == ("webhook", "failed", 3)
    assert row["error"].startswith("HTTP 503")


def test_a_restart_sends_what_was_left_pending_once(tmp_path, httpserver):
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    data = tmp_path / "data"
    task_uuid = str(uuid.uuid4())
    store = Store(data)  # a server that stored a result and died before its webhook went out
    image = store.put_image(b"\x89PNG not really", "png", owner=key_digest(KEY))
    store.accept(task_uuid, "imageInference", {"outputType": "URL", "ext": "png",
                                               "webhookURL": httpserver.url_for("/hook"),
                                               "baseURL": "http://127.0.0.1:8080"}, 1, key_digest(KEY))
    store.add_result(task_uuid, 0, image.image_uuid, 7, None, sinks=[SinkState(task_uuid, 0, "webhook", "pending")])
    store.close()
    for _ in range(2):  # the second start finds nothing pending: nothing is sent twice
        app = make_app(data)
        with TestClient(app, base_url="http://testserver"):
            rows = settled(app, task_uuid)
    assert [(r["state"], r["attempts"]) for r in rows] == [("ok", 1)]
    (request, _), = httpserver.log
    body = json.loads(request.get_data())
    assert (body["taskUUID"], body["imageUUID"], body["seed"]) == (task_uuid, image.image_uuid, 7)
    assert body["imageURL"].startswith(f"http://127.0.0.1:8080/v1/images/{image.image_uuid}.png?expires=")


def test_a_webhook_url_that_is_not_http_is_a_protocol_error(client_app):
    error = send(client_app, task(webhookURL="ftp://example.com/hook"))["errors"][0]
    assert error["parameter"] == "webhookURL" and "webhookURL" in error["message"]


# --- lora ---------------------------------------------------------------------------------------------


def write_lora(path, seed=0, module="diffusion_model.img_in"):
    rng = np.random.default_rng(seed)
    save_file({f"{module}.lora_A.weight": rng.standard_normal((2, 128)).astype(np.float32),
               f"{module}.lora_B.weight": rng.standard_normal((64, 2)).astype(np.float32)}, str(path))
    return str(path)


def test_tasks_with_different_loras_never_share_a_batch(tmp_path):
    a, b = write_lora(tmp_path / "a.safetensors", 1), write_lora(tmp_path / "b.safetensors", 2)
    engine = FakeEngine()
    app = make_app(tmp_path / "data", engine, window_s=0.5)  # all four wait in one window
    tasks = [task(lora=[{"model": a}]), task(lora=[{"model": b}]), task(lora=[{"model": a}]), task(lora=[{"model": b}])]
    with TestClient(app, base_url="http://testserver") as client:
        answer = send(client, *tasks)
    assert "errors" not in answer and len(answer["data"]) == 4
    assert len(engine.calls) == 2  # one batch per LoRA set: the same set did share
    hashes = [call.lora_hashes for call in engine.calls]
    assert len(set(hashes)) == 2 and all(len(call.prompts) == 2 for call in engine.calls)
    assert sorted(path for call in engine.calls for path, _ in call.loras) == [a, b]


def test_a_missing_lora_file_is_a_protocol_error_naming_the_field(client_app, tmp_path):
    error = send(client_app, task(lora=[{"model": str(tmp_path / "nope.safetensors")}]))["errors"][0]
    assert error["parameter"] == "lora[0].model" and "nope.safetensors" in error["message"]


# --- ultralytics (the face pass) ------------------------------------------------------------------------


def test_the_face_pass_runs_on_the_batcher_result_before_encoding(tmp_path):
    engine = FakeEngine()
    app = make_app(tmp_path / "data", engine)
    t = task(outputFormat="PNG", outputType="base64Data", ultralytics={"confidence": 0.4}, seed=9)
    with TestClient(app, base_url="http://testserver") as client:
        (item,) = send(client, t)["data"]
    got = decode(base64.b64decode(item["imageBase64Data"]))
    (settings, seed), = engine.face_calls
    assert seed == item["seed"] and settings.confidence == 0.4 and settings.positive_prompt == t["positivePrompt"]
    rendered = expected_pixels(t, 0)
    refined = FakeEngine().refine_faces(rendered, settings, seed).image
    assert np.array_equal(got, refined) and not np.array_equal(got, rendered)


@pytest.fixture
def client_app(tmp_path):
    with TestClient(make_app(tmp_path / "data"), base_url="http://testserver") as client:
        yield client


class _Prefix(URIPattern):
    """A pytest-httpserver URI matcher for every path under a prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def match(self, uri: str) -> bool:
        return uri.startswith(self.prefix)
