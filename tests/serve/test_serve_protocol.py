"""`flowgen serve` speaks the Runware task protocol: REST and WebSocket, tasks, errors, the store.

The app runs behind the real batcher with FakeEngine (deterministic pixels from the job and seed),
so each test takes well under a second; one test starts real uvicorn on a free loopback port.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from flowgen.errors import FlowgenError
from flowgen.recipe.api import validate_task
from flowgen.run.engine import FakeEngine
from flowgen.serve.auth import check_can_listen, key_digest, load_keys
from flowgen.serve.store import image_uuid_for
from tests.serve.fake_app import AUTH, KEY, TINY, GatedEngine, decode, expected_pixels, make_app, png_bytes, task

# --- auth -----------------------------------------------------------------------------------------


def test_rest_needs_a_bearer_key_and_a_bad_one_is_invalid_api_key(client):
    ping = [{"taskType": "ping", "ping": True}]
    assert client.post("/v1", json=ping, headers=AUTH).json() == {"data": [{"taskType": "ping", "pong": True}]}
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        response = client.post("/v1", json=ping, headers=headers)
        assert response.status_code == 401
        assert [e["code"] for e in response.json()["errors"]] == ["invalidApiKey"]
        assert "data" not in response.json()


def test_websocket_authenticates_pings_and_resumes_its_session(client):
    with client.websocket_connect("/v1") as ws:
        ws.send_json([{"taskType": "ping", "ping": True}])  # before authentication: refused
        assert ws.receive_json()["errors"][0]["code"] == "unauthenticated"
        ws.send_json([{"taskType": "authentication", "apiKey": "nope"}])
        error = ws.receive_json()["errors"][0]
        assert (error["code"], error["taskType"]) == ("invalidApiKey", "authentication")
        ws.send_json([{"taskType": "authentication", "apiKey": KEY}])
        session = ws.receive_json()["data"][0]["connectionSessionUUID"]
        uuid.UUID(session)
        ws.send_json([{"taskType": "ping", "ping": True}])
        assert ws.receive_json() == {"data": [{"taskType": "ping", "pong": True}]}
    with client.websocket_connect("/v1") as ws:
        ws.send_json([{"taskType": "authentication", "apiKey": KEY, "connectionSessionUUID": session}])
        assert ws.receive_json()["data"][0]["connectionSessionUUID"] == session


def test_keys_come_from_the_environment_or_a_file_and_an_open_server_stays_on_loopback(tmp_path):
    file = tmp_path / "keys"
    file.write_text("# comment\nfile-key\n\n")
    assert load_keys({"FLOWGEN_API_KEYS": " a, b ,", "FLOWGEN_API_KEY_FILE": str(file)}) == {"a", "b", "file-key"}
    assert load_keys({}) == frozenset()
    check_can_listen("127.0.0.1", frozenset())
    check_can_listen("::1", frozenset())
    check_can_listen("0.0.0.0", frozenset({"k"}))
    with pytest.raises(FlowgenError, match=r"--host 0.0.0.0: no API key configured"):
        check_can_listen("0.0.0.0", frozenset())
    with pytest.raises(FlowgenError, match="FLOWGEN_API_KEY_FILE=.*cannot read"):
        load_keys({"FLOWGEN_API_KEY_FILE": str(tmp_path / "missing")})


# --- imageInference -------------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["URL", "base64Data", "dataURI"])
def test_sync_inference_returns_number_results_in_the_output_type_asked(client, output_type):
    t = task(numberResults=2, outputType=output_type, outputFormat="PNG", includeCost=True, seed=41)
    response = client.post("/v1", json=[t], headers=AUTH)
    assert response.status_code == 200, response.text
    items = response.json()["data"]
    assert [item["seed"] for item in items] == [41, 42]  # flowgen's result_seed: seed + i
    assert all(item["taskUUID"] == t["taskUUID"] and item["taskType"] == "imageInference" for item in items)
    assert all(isinstance(item["cost"], float) and item["cost"] >= 0 for item in items)
    assert len({item["imageUUID"] for item in items}) == 2
    for index, item in enumerate(items):
        if output_type == "URL":
            assert item["imageURL"].startswith(f"http://testserver/v1/images/{item['imageUUID']}.png?expires=")
            fetched = client.get(item["imageURL"])
            assert fetched.headers["content-type"] == "image/png"
            data = fetched.content
        elif output_type == "base64Data":
            data = base64.b64decode(item["imageBase64Data"])
        else:
            prefix, _, encoded = item["imageDataURI"].partition(",")
            assert prefix == "data:image/png;base64"
            data = base64.b64decode(encoded)
        np.testing.assert_array_equal(decode(data), expected_pixels(t, index))


def test_without_a_seed_each_result_has_a_random_seed_in_the_unsigned_32_bit_range(client):
    bases = set()
    for _ in range(3):
        t = task(numberResults=2, outputType="base64Data", outputFormat="PNG")
        items = client.post("/v1", json=[t], headers=AUTH).json()["data"]
        base = items[0]["seed"]
        assert [i["seed"] for i in items] == [base, base + 1] and 0 <= base and base + 1 < 2**32  # the spec's range
        np.testing.assert_array_equal(decode(base64.b64decode(items[1]["imageBase64Data"])),
                                      expected_pixels({**t, "seed": base}, 1))  # rendered with the seed it names
        bases.add(base)
        assert "cost" not in items[0]
    assert len(bases) == 3  # random, not derived from anything the client sent


def test_async_inference_acks_then_get_response_goes_from_processing_to_success(tmp_path):
    gate = threading.Event()

    class SlowEngine(FakeEngine):
        def generate_batch(self, request):
            gate.wait(10)
            return super().generate_batch(request)

    with TestClient(make_app(tmp_path / "data", SlowEngine())) as client:
        t = task(deliveryMethod="async", numberResults=2, outputType="URL")
        ack = client.post("/v1", json=[t], headers=AUTH).json()
        assert ack == {"data": [{"taskType": "imageInference", "taskUUID": t["taskUUID"]}]}
        poll = [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]
        assert client.post("/v1", json=poll, headers=AUTH).json()["data"] == [
            {"taskType": "imageInference", "taskUUID": t["taskUUID"], "status": "processing"}]
        gate.set()
        deadline = time.monotonic() + 10
        while True:
            items = client.post("/v1", json=poll, headers=AUTH).json()["data"]
            if items[0]["status"] == "success" or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert [i["status"] for i in items] == ["success", "success"]
        assert [i["taskType"] for i in items] == ["imageInference"] * 2
        assert all(client.get(i["imageURL"]).status_code == 200 for i in items)


def test_websocket_sync_inference_and_a_ping_while_it_runs(client):
    with client.websocket_connect("/v1") as ws:
        ws.send_json([{"taskType": "authentication", "apiKey": KEY}])
        ws.receive_json()
        t = task(numberResults=2, outputType="dataURI")
        ws.send_json([t, {"taskType": "ping", "ping": True}])
        frames = [ws.receive_json(), ws.receive_json()]
    pong = [f for f in frames if f["data"][0]["taskType"] == "ping"]
    result = [f for f in frames if f["data"][0]["taskType"] == "imageInference"]
    assert len(pong) == 1 and len(result) == 1
    assert [i["imageDataURI"].startswith("data:image/jpeg;base64,") for i in result[0]["data"]] == [True, True]


def test_an_uploaded_image_is_usable_as_a_reference_by_uuid_data_uri_or_base64(client):
    raw = png_bytes(200)
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
              "image": "data:image/png;base64," + base64.b64encode(raw).decode()}
    item = client.post("/v1", json=[upload], headers=AUTH).json()["data"][0]
    assert item["taskUUID"] == upload["taskUUID"] and item["taskType"] == "imageUpload"
    assert client.get(item["imageURL"]).content == raw  # stored as sent, content-addressed
    import hashlib
    assert item["imageUUID"] == image_uuid_for(hashlib.sha256(raw).hexdigest())
    pixels = []
    for form in (item["imageUUID"], upload["image"], base64.b64encode(raw).decode()):
        t = task(outputType="base64Data", outputFormat="PNG", seed=7, inputs={"referenceImages": [form]})
        out = client.post("/v1", json=[t], headers=AUTH).json()["data"][0]
        pixels.append(decode(base64.b64decode(out["imageBase64Data"])))
    np.testing.assert_array_equal(pixels[0], pixels[1])
    np.testing.assert_array_equal(pixels[0], pixels[2])
    t = task(outputType="base64Data", outputFormat="PNG", seed=7)
    without = client.post("/v1", json=[t], headers=AUTH).json()["data"][0]
    assert not np.array_equal(decode(base64.b64decode(without["imageBase64Data"])), pixels[0])


# --- errors ---------------------------------------------------------------------------------------


def test_a_task_error_has_the_recipe_message_the_parameter_and_the_task_uuid(client):
    t = task(width=100)
    response = client.post("/v1", json=[t], headers=AUTH)
    assert response.status_code == 400
    body = response.json()
    assert "data" not in body
    [error] = body["errors"]
    recipe_message = validate_task({"width": 100}, "task")[0]
    assert error["message"] == recipe_message and "task.width" in recipe_message
    assert (error["code"], error["parameter"], error["taskUUID"], error["taskType"]) == (
        "invalidWidth", "width", t["taskUUID"], "imageInference")
    error = client.post("/v1", json=[task(model="runware:999@9")], headers=AUTH).json()["errors"][0]
    assert error["code"] == "invalidModel" and "flowgen:1@1" in error["message"]


def test_a_bad_reference_is_one_error_naming_it(client, httpserver):
    httpserver.expect_request("/notimage").respond_with_data(b"hello", content_type="text/plain")
    cases = {"not-a-uuid-or-image": "is not an imageUUID", str(uuid.uuid4()): "no image with imageUUID",
             httpserver.url_for("/notimage"): "not an image"}
    for reference, words in cases.items():
        t = task(inputs={"referenceImages": [reference]})
        error = client.post("/v1", json=[t], headers=AUTH).json()["errors"][0]
        assert error["parameter"] == "inputs.referenceImages[0]" and error["taskUUID"] == t["taskUUID"]
        assert words in error["message"]


def test_a_reference_url_that_times_out_is_an_error_and_the_server_keeps_serving(tmp_path, httpserver):
    from flowgen.serve.inputs import InputLimits

    def slow(request):
        time.sleep(1.0)
        from werkzeug import Response
        return Response(png_bytes(), content_type="image/png")

    httpserver.expect_request("/slow").respond_with_handler(slow)
    with TestClient(make_app(tmp_path / "d", input_limits=InputLimits(fetch_timeout_s=0.2))) as client:
        t = task(inputs={"referenceImages": [httpserver.url_for("/slow")]})
        error = client.post("/v1", json=[t], headers=AUTH).json()["errors"][0]
        assert "timed out" in error["message"] and error["taskUUID"] == t["taskUUID"]
        assert client.post("/v1", json=[{"taskType": "ping", "ping": True}], headers=AUTH).status_code == 200


def test_malformed_non_array_unknown_and_oversize_requests_are_protocol_errors(tmp_path):
    with TestClient(make_app(tmp_path / "d", max_body=4096)) as client:
        def post(content):
            return client.post("/v1", content=content, headers={**AUTH, "content-type": "application/json"})

        response = post(b"[{not json")
        assert response.status_code == 400 and response.json()["errors"][0]["code"] == "invalidJSON"
        assert post(b'"a string"').json()["errors"][0]["code"] == "invalidRequestBody"
        lone = task()  # one task object, not in an array
        error = post(json.dumps(lone).encode()).json()["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("invalidRequestBody", lone["taskUUID"])
        unknown = {"taskType": "videoInference", "taskUUID": str(uuid.uuid4())}
        error = post(json.dumps([unknown]).encode()).json()["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("unsupportedTaskType", unknown["taskUUID"])
        response = post(b"[" + b" " * 5000 + b"]")
        assert response.status_code == 413 and response.json()["errors"][0]["code"] == "requestTooLarge"
        with client.websocket_connect("/v1") as ws:
            ws.send_json([{"taskType": "authentication", "apiKey": KEY}])
            ws.receive_json()
            ws.send_text("{{{")
            assert ws.receive_json()["errors"][0]["code"] == "invalidJSON"
            ws.send_text("[" + " " * 5000 + "]")
            assert ws.receive_json()["errors"][0]["code"] == "requestTooLarge"
            ws.send_json([{"taskType": "ping", "ping": True}])  # still serving
            assert ws.receive_json()["data"][0]["pong"] is True


# --- the store ------------------------------------------------------------------------------------


def test_a_new_server_on_the_same_data_dir_answers_get_response_for_finished_tasks(tmp_path):
    data = tmp_path / "data"
    t = task(outputType="URL", numberResults=2, seed=3)
    with TestClient(make_app(data)) as client:
        first = client.post("/v1", json=[t], headers=AUTH).json()["data"]
    with TestClient(make_app(data)) as client:
        again = client.post("/v1", json=[{"taskType": "getResponse", "taskUUID": t["taskUUID"]}],
                            headers=AUTH).json()["data"]
        assert [i["imageUUID"] for i in again] == [i["imageUUID"] for i in first]
        assert [i["status"] for i in again] == ["success", "success"]
        assert client.get(again[0]["imageURL"]).content == client.get(first[0]["imageURL"]).content
        # the same taskUUID sent again is answered from the record, not rendered twice
        assert [i["imageUUID"] for i in client.post("/v1", json=[t], headers=AUTH).json()["data"]] == \
            [i["imageUUID"] for i in first]


def test_a_task_the_server_did_not_finish_is_failed_not_left_processing(tmp_path):
    from flowgen.serve.store import Store

    store = Store(tmp_path / "d")
    store.accept("11111111-1111-4111-8111-111111111111", "imageInference", {"outputType": "URL"}, 1, key_digest(KEY))
    store.close()  # as a server killed with -9 leaves it
    with TestClient(make_app(tmp_path / "d")) as client:
        error = client.post("/v1", json=[{"taskType": "getResponse", "taskUUID": "11111111-1111-4111-8111-111111111111"}],
                            headers=AUTH).json()["errors"][0]
        assert error["code"] == "taskInterrupted" and error["taskUUID"] == "11111111-1111-4111-8111-111111111111"


# --- real uvicorn ---------------------------------------------------------------------------------


def test_real_uvicorn_on_loopback_answers_rest_and_serves_images(tmp_path):
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(tmp_path / "d"), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            t = task(numberResults=2, outputType="URL")
            items = http.post("/v1", json=[t], headers=AUTH).json()["data"]
            assert len(items) == 2
            image = http.get(items[0]["imageURL"])
            assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
            assert items[0]["imageURL"].startswith(f"http://127.0.0.1:{port}/v1/images/")
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()


# --- faults ---------------------------------------------------------------------------------------


def poll_until_done(client, task_uuid, deadline_s=10.0):
    poll = [{"taskType": "getResponse", "taskUUID": task_uuid}]
    deadline = time.monotonic() + deadline_s
    while True:
        items = client.post("/v1", json=poll, headers=AUTH).json()["data"]
        if items[0]["status"] != "processing" or time.monotonic() > deadline:
            return items
        time.sleep(0.02)


def test_a_websocket_client_that_leaves_mid_task_gets_its_result_after_reconnecting(tmp_path):
    engine = GatedEngine()
    with TestClient(make_app(tmp_path / "d", engine)) as client:
        with client.websocket_connect("/v1") as ws:
            ws.send_json([{"taskType": "authentication", "apiKey": KEY}])
            session = ws.receive_json()["data"][0]["connectionSessionUUID"]
            t = task(numberResults=2)  # sync: the answer would come on this connection
            ws.send_json([t])
            time.sleep(0.1)
        engine.gate.set()
        with client.websocket_connect("/v1") as ws:
            ws.send_json([{"taskType": "authentication", "apiKey": KEY, "connectionSessionUUID": session}])
            assert ws.receive_json()["data"][0]["connectionSessionUUID"] == session
        items = poll_until_done(client, t["taskUUID"])
        assert [i["status"] for i in items] == ["success", "success"]


def test_shutdown_finishes_every_accepted_task(tmp_path):
    engine = GatedEngine()
    t = task(deliveryMethod="async", numberResults=2)
    with TestClient(make_app(tmp_path / "d", engine)) as client:
        assert client.post("/v1", json=[t], headers=AUTH).json()["data"][0]["taskUUID"] == t["taskUUID"]
        threading.Timer(0.2, engine.gate.set).start()  # the engine is still busy when shutdown begins
    with TestClient(make_app(tmp_path / "d")) as client:
        items = poll_until_done(client, t["taskUUID"], 0)
        assert [i["status"] for i in items] == ["success", "success"]


def test_check_content_answers_nsfw_content_per_result(client, monkeypatch):
    import flowgen.safety

    class Verdict:
        def __init__(self, nsfw):
            self.nsfw = nsfw

    class StandInChecker:  # NudeNet's model is slow to load; the flag's plumbing is what is tested
        def load(self):
            return self

        def check(self, pixels):
            return Verdict(bool(pixels[0, 0, 0] % 2))

    monkeypatch.setattr(flowgen.safety, "ContentChecker", StandInChecker)
    t = task(numberResults=2, outputType="base64Data", outputFormat="PNG", seed=5, safety={"checkContent": True})
    items = client.post("/v1", json=[t], headers=AUTH).json()["data"]
    assert [i["NSFWContent"] for i in items] == [bool(expected_pixels(t, i)[0, 0, 0] % 2) for i in range(2)]
    assert "NSFWContent" not in client.post("/v1", json=[task()], headers=AUTH).json()["data"][0]


def test_the_cli_refuses_an_open_server_on_a_public_address(monkeypatch):
    from click.testing import CliRunner

    from flowgen.cli import main

    monkeypatch.delenv("FLOWGEN_API_KEYS", raising=False)
    monkeypatch.delenv("FLOWGEN_API_KEY_FILE", raising=False)
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --host 0.0.0.0: no API key configured, so flowgen serve listens only on a loopback address "
        "(127.0.0.1, ::1, localhost); set FLOWGEN_API_KEYS or FLOWGEN_API_KEY_FILE"]
    result = CliRunner().invoke(main, ["serve", "--model", "runware:999@9"])
    assert result.exit_code == 2 and result.output.startswith("error: --model runware:999@9: unknown model")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--port", str(port), "--model", TINY])
    assert result.exit_code == 2 and result.output.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen")


def test_one_key_may_have_only_so_many_unfinished_tasks(tmp_path):
    engine = GatedEngine()
    with TestClient(make_app(tmp_path / "d", engine, max_tasks_per_key=1)) as client:
        first = task(deliveryMethod="async")
        assert client.post("/v1", json=[first], headers=AUTH).status_code == 200
        second = task(deliveryMethod="async")
        response = client.post("/v1", json=[second], headers=AUTH)
        assert response.status_code == 429
        error = response.json()["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("tooManyRequests", second["taskUUID"])
        engine.gate.set()
        assert poll_until_done(client, first["taskUUID"])[0]["status"] == "success"
        deadline = time.monotonic() + 5  # the slot frees just after the record turns success
        while (status := client.post("/v1", json=[second], headers=AUTH).status_code) == 429:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert status == 200


def test_the_same_task_uuid_twice_in_one_request_renders_once(tmp_path):
    engine = FakeEngine()
    with TestClient(make_app(tmp_path / "d", engine)) as client:
        t = task(numberResults=2)
        items = client.post("/v1", json=[t, t], headers=AUTH).json()["data"]
    assert len(items) == 4 and [i["imageUUID"] for i in items[:2]] == [i["imageUUID"] for i in items[2:]]
    assert sum(len(call.prompts) for call in engine.calls) == 2  # one batch of two, nothing rendered twice


def test_an_image_url_stops_answering_when_its_ttl_is_over(client):
    t = task(ttl=60)
    item = client.post("/v1", json=[t], headers=AUTH).json()["data"][0]
    assert client.get(item["imageURL"]).status_code == 200
    store = client.app.state.server.service.store
    with store._lock:  # as if 60 seconds had passed
        store.conn.execute("UPDATE images SET expires = 1 WHERE image_uuid = ?", (item["imageUUID"],))
    response = client.get(item["imageURL"])
    assert response.status_code == 410 and response.json()["errors"][0]["code"] == "imageExpired"
    assert client.get(item["imageURL"].replace(".jpg", ".png")).status_code == 404


def test_an_engine_failure_fails_that_task_only(tmp_path):
    class FailingEngine(FakeEngine):
        def generate_batch(self, request):
            if request.prompts[0] == "boom":
                raise RuntimeError("out of device memory")
            return super().generate_batch(request)

    with TestClient(make_app(tmp_path / "d", FailingEngine())) as client:
        bad = task(positivePrompt="boom")
        error = client.post("/v1", json=[bad], headers=AUTH).json()["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("inferenceFailed", bad["taskUUID"])
        assert "out of device memory" in error["message"]
        assert client.post("/v1", json=[task()], headers=AUTH).status_code == 200
