"""`flowgen serve` in front of more than one client, and against bodies meant to hurt it (issue 18).

Two keys are isolated (tasks, uploads, image URLs); a decompression-bomb PNG, a body nested 2,000
deep, 50,000 unknown fields, 70 invalid tasks and an unexpected exception are each answered as the
protocol's error naming the task, over REST and WebSocket, and the WebSocket stays up with what it
is owed; slow reference fetches never hold up another key's getResponse; an interrupted task runs
again when resent; presigned URLs never reach the store's task records. The engine is FakeEngine behind the real
batcher; receivers and slow servers are started on loopback by the tests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import socket
import sqlite3
import struct
import threading
import time
import uuid
import zlib

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from flowgen.run.engine import FakeEngine
from flowgen.serve.app import create_app
from flowgen.serve.auth import key_digest
from flowgen.serve.batcher import Batcher
from flowgen.serve.inputs import InputLimits
from flowgen.serve.store import Store
from flowgen.serve.urls import URL_LIFETIME_S
from tests.serve.fake_app import (
    GatedEngine,
    decode,
    expected_pixels,
    png_bytes,
    task,
    tiny_card,
)
from tests.serve.sdk_clients import run_client, sdk_python
from tests.serve.serve_process import ServeProcess, free_port

KEY_A, KEY_B = "abuse-key-a", "abuse-key-b"
AUTH_A, AUTH_B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
PING = {"taskType": "ping", "ping": True}


def make_app(data_dir, engine=None, more_keys=(), **kwargs):
    engine = engine or FakeEngine()
    batcher = Batcher(lambda name: engine, window_s=0.01, max_batch=4)
    return create_app(batcher=batcher, data_dir=data_dir, models=[tiny_card()],
                      keys=frozenset({KEY_A, KEY_B, *more_keys}), **kwargs)


@pytest.fixture
def client(tmp_path):
    with TestClient(make_app(tmp_path / "data"), base_url="http://testserver") as client:
        yield client


def post(client, tasks, auth=AUTH_A):
    return client.post("/v1", json=tasks, headers=auth)


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def upload(image: str, **fields) -> dict:
    return {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": image, **fields}


def get_response(task_uuid: str) -> dict:
    return {"taskType": "getResponse", "taskUUID": task_uuid}


def bomb_png(side: int = 30000) -> bytes:
    """A 100-byte PNG whose header claims side x side pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def deep_body(task_uuid: str, depth: int = 2000) -> str:
    """A task whose one unknown field nests `depth` arrays."""
    head = {"taskType": "imageInference", "taskUUID": task_uuid, "model": "flowgen:1@1", "positivePrompt": "x"}
    return "[" + json.dumps(head)[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}]"


def authenticate(ws, key=KEY_A) -> None:
    ws.send_json([{"taskType": "authentication", "apiKey": key}])
    assert "data" in ws.receive_json()


def stored_files(data_dir) -> list:
    return [p for p in (data_dir / "images").rglob("*") if p.is_file()]


# --- 1. tenants: tasks, uploads and image URLs belong to the key that sent them ---------------------


def test_another_key_cannot_read_reuse_or_fetch_a_keys_task(tmp_path):
    data = tmp_path / "data"
    with TestClient(make_app(data), base_url="http://testserver") as client:
        t = task(outputType="URL", seed=4)
        (item,) = post(client, [t]).json()["data"]
        # B polling A's task: as if there were none
        error = post(client, [get_response(t["taskUUID"])], AUTH_B).json()["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("taskNotFound", t["taskUUID"])
        # B sending A's taskUUID: refused, never answered with A's result
        response = post(client, [task(taskUUID=t["taskUUID"], seed=4)], AUTH_B)
        assert response.status_code == 400 and item["imageUUID"] not in response.text
        assert response.json()["errors"][0]["code"] == "invalidTaskUUID"
        with client.websocket_connect("/v1") as ws:
            authenticate(ws, KEY_B)
            ws.send_json([get_response(t["taskUUID"])])
            assert ws.receive_json()["errors"][0]["code"] == "taskNotFound"
        # A still gets its own
        assert post(client, [get_response(t["taskUUID"])]).json()["data"][0]["imageUUID"] == item["imageUUID"]

        # the image: the handed-out URL is signed; the bare path answers nobody but the owner's key
        url = item["imageURL"]
        assert client.get(url).status_code == 200
        bare = url.split("?")[0]
        assert client.get(bare).status_code == 404
        assert client.get(bare, headers=AUTH_B).status_code == 404
        assert client.get(bare, headers=AUTH_A).content == client.get(url).content
        forged = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
        assert client.get(forged).status_code == 404
        name = bare.rsplit("/", 1)[1]
        store = client.app.state.server.service.store
        expired = store.urls.url("http://testserver", name, None, now=time.time() - URL_LIFETIME_S - 2 * 3600)
        response = client.get(expired)
        assert response.status_code == 410 and response.json()["errors"][0]["code"] == "imageExpired"

    # the store knows each task's owner by the key's digest, never the key itself
    db = sqlite3.connect(data / "serve.sqlite")
    assert db.execute("SELECT owner FROM tasks WHERE task_uuid = ?", (t["taskUUID"],)).fetchone()[0] == \
        hashlib.sha256(KEY_A.encode()).hexdigest()
    db.close()
    for path in data.rglob("*"):
        if path.is_file():
            assert KEY_A.encode() not in path.read_bytes() and KEY_B.encode() not in path.read_bytes(), path


def test_uploads_and_their_images_belong_to_the_key_that_sent_them(client):
    raw = png_bytes(90)
    sent = upload(data_uri(raw))
    (item,) = post(client, [sent]).json()["data"]
    # B cannot name A's upload as a reference, nor poll it, nor reuse its taskUUID
    t = task(inputs={"referenceImages": [item["imageUUID"]]}, seed=1)
    error = post(client, [t], AUTH_B).json()["errors"][0]
    assert (error["code"], error["parameter"]) == ("invalidImage", "inputs.referenceImages[0]")
    assert "no image with imageUUID" in error["message"]
    assert post(client, [get_response(sent["taskUUID"])], AUTH_B).json()["errors"][0]["code"] == "taskNotFound"
    error = post(client, [upload(data_uri(png_bytes(91)), taskUUID=sent["taskUUID"])], AUTH_B).json()["errors"][0]
    assert error["code"] == "invalidTaskUUID"
    # the same bytes uploaded by B are B's too (one file, two owners)
    (mine,) = post(client, [upload(data_uri(raw))], AUTH_B).json()["data"]
    assert mine["imageUUID"] == item["imageUUID"]
    assert "data" in post(client, [task(inputs={"referenceImages": [item["imageUUID"]]}, seed=1)], AUTH_B).json()
    assert "data" in post(client, [task(inputs={"referenceImages": [item["imageUUID"]]}, seed=1)]).json()


# --- 2. slow fetches never hold up the threads that answer getResponse ------------------------------


class DripHandler(http.server.BaseHTTPRequestHandler):
    """Sends its status line a byte every 0.1 s for DRIP_S seconds, then hangs up (a fetch with a
    total deadline gives up sooner)."""

    DRIP_S = 4.0

    def do_GET(self):
        self.server.started.release()
        line = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"x" * 200
        deadline = time.monotonic() + self.DRIP_S
        with contextlib.suppress(OSError):
            for byte in line:
                if time.monotonic() > deadline:
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)

    def log_message(self, *args):
        pass


class DripServer(http.server.ThreadingHTTPServer):
    request_queue_size = 64  # every fetch connects at once (the default backlog of 5 would stagger them)
    daemon_threads = True

    def __init__(self, *args):
        super().__init__(*args)
        self.started = threading.Semaphore(0)  # released once per fetch that reached it

    def wait_for(self, fetches: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(fetches):
            assert self.started.acquire(timeout=max(0.0, deadline - time.monotonic())), "the fetches never came"


@contextlib.contextmanager
def uvicorn_serving(app):
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_many_slow_reference_fetches_do_not_delay_another_keys_get_response(tmp_path):
    drip = DripServer(("127.0.0.1", 0), DripHandler)
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    slow_url = f"http://127.0.0.1:{drip.server_address[1]}/ref.png"
    hog_keys = [f"hog-key-{i}" for i in range(12)]  # 12 keys x 4 fetches in flight each: more than anyio's 40 threads
    app = make_app(tmp_path / "data", more_keys=hog_keys, input_limits=InputLimits(fetch_timeout_s=1.5))
    try:
        with uvicorn_serving(app) as url, httpx.Client(base_url=url, timeout=30) as rest:
            finished = task(seed=2, outputType="base64Data")
            assert rest.post("/v1", json=[finished], headers=AUTH_B).status_code == 200
            # 48 tasks, each fetching from the dripping server
            hogs = [threading.Thread(target=lambda k=key: httpx.post(url + "/v1", timeout=60, json=[
                task(seed=1, inputs={"referenceImages": [slow_url]})], headers={"Authorization": f"Bearer {k}"}))
                for key in hog_keys for _ in range(4)]
            for hog in hogs:
                hog.start()
            drip.wait_for(16, timeout=20)  # as many as the input threads hold are fetching: the rest queue
            time.sleep(0.3)
            waits = []
            for _ in range(3):
                start = time.monotonic()
                answer = rest.post("/v1", json=[get_response(finished["taskUUID"]), PING], headers=AUTH_B).json()
                waits.append(time.monotonic() - start)
                assert answer["data"][0]["status"] == "success" and answer["data"][1] == {"taskType": "ping",
                                                                                          "pong": True}
            for hog in hogs:
                hog.join(60)
    finally:
        drip.shutdown()
    assert max(waits) < 1.0, waits  # before: each waited for a fetch to give up (seconds)


# --- 6. bombs and deep bodies are protocol errors; the WebSocket stays up with what it is owed -------


def test_a_decompression_bomb_png_is_an_error_naming_the_task_over_rest(client, tmp_path):
    bomb = data_uri(bomb_png())
    sent = upload(bomb)
    response = post(client, [sent])
    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert (error["code"], error["taskUUID"], error["parameter"]) == ("invalidImage", sent["taskUUID"], "image")
    assert "900,000,000 pixels" in error["message"] and "limit" in error["message"]
    t = task(inputs={"referenceImages": [bomb]})
    error = post(client, [t]).json()["errors"][0]
    assert (error["code"], error["taskUUID"]) == ("invalidImage", t["taskUUID"])
    assert stored_files(tmp_path / "data") == []  # 7: refused inputs are never stored


def test_a_deep_json_body_is_an_error_naming_the_task_over_rest(client):
    task_uuid = str(uuid.uuid4())
    response = client.post("/v1", content=deep_body(task_uuid), headers={**AUTH_A, "content-type": "application/json"})
    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert (error["code"], error["taskUUID"]) == ("invalidRequestBody", task_uuid)
    assert "nests" in error["message"]
    # deep enough to refuse, shallow enough to parse: refused by name before validation
    response = client.post("/v1", content=deep_body(task_uuid, 40), headers={**AUTH_A, "content-type": "application/json"})
    (error,) = response.json()["errors"]
    assert (error["code"], error["taskUUID"]) == ("invalidRequestBody", task_uuid) and "32 levels" in error["message"]
    assert post(client, [PING]).json()["data"][0]["pong"] is True


def test_over_a_websocket_bombs_deep_bodies_and_failures_are_errors_and_owed_results_still_arrive(tmp_path):
    engine = GatedEngine()
    with TestClient(make_app(tmp_path / "data", engine)) as client, client.websocket_connect("/v1") as ws:
        authenticate(ws)
        owed = task(numberResults=2, seed=8, outputType="base64Data", outputFormat="PNG")
        ws.send_json([owed])  # sync: its results are owed on this connection; the engine waits
        bomb = upload(data_uri(bomb_png()))
        ws.send_json([bomb])
        error = ws.receive_json()["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("invalidImage", bomb["taskUUID"])
        deep_uuid = str(uuid.uuid4())
        ws.send_text(deep_body(deep_uuid))
        error = ws.receive_json()["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("invalidRequestBody", deep_uuid)

        service = client.app.state.server.service
        real = service.image_upload
        service.image_upload = lambda raw, owner: (_ for _ in ()).throw(RuntimeError("an unforeseen bug"))
        broken = upload(data_uri(png_bytes()))
        ws.send_json([broken])
        error = ws.receive_json()["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("internalError", broken["taskUUID"])
        service.image_upload = real

        ws.send_json([PING])
        assert ws.receive_json() == {"data": [{"taskType": "ping", "pong": True}]}  # the socket is up
        engine.gate.set()
        frame = ws.receive_json()
        assert [item["seed"] for item in frame["data"]] == [8, 9]
        np.testing.assert_array_equal(decode(base64.b64decode(frame["data"][1]["imageBase64Data"])),
                                      expected_pixels(owed, 1))


def test_an_unexpected_exception_in_one_task_is_that_tasks_protocol_error_over_rest(client):
    service = client.app.state.server.service

    def broken(*args, **kwargs):
        raise RecursionError("an unforeseen bug")

    service.image_inference = broken
    t = task()
    response = post(client, [t, PING])
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    (error,) = response.json()["errors"]
    assert (error["code"], error["taskUUID"], error["taskType"]) == ("internalError", t["taskUUID"], "imageInference")
    assert "Traceback" not in error["message"] and "\n" not in error["message"]


# --- 7. only accepted input images are stored ------------------------------------------------------


def test_a_refused_input_image_is_never_stored_nor_served(client, tmp_path):
    small = png_bytes(size=8)  # below the reference minimum side
    sent = upload(data_uri(small))
    error = post(client, [sent]).json()["errors"][0]
    assert error["code"] == "invalidImage" and "8x8" in error["message"]
    image_uuid = str(uuid.UUID(bytes=hashlib.sha256(small).digest()[:16], version=4))
    assert client.get(f"/v1/images/{image_uuid}.png", headers=AUTH_A).status_code == 404
    assert stored_files(tmp_path / "data") == []
    assert not list((tmp_path / "data" / "incoming").glob("*"))  # the staged copy is gone too
    store = client.app.state.server.service.store
    assert store.image(image_uuid) is None


# --- 8. an interrupted task resent with its taskUUID runs -----------------------------------------


@pytest.mark.parametrize("delivery", ["sync", "async"])
def test_an_interrupted_task_sent_again_with_the_same_uuid_runs(tmp_path, delivery):
    data = tmp_path / "data"
    t = task(seed=6, outputType="base64Data", outputFormat="PNG", numberResults=2, deliveryMethod=delivery)
    store = Store(data)  # a server that accepted the task and died (kill -9) before it finished
    store.accept(t["taskUUID"], "imageInference", {"outputType": "base64Data"}, 2, key_digest(KEY_A))
    store.close()
    with TestClient(make_app(data)) as client:
        interrupted = post(client, [get_response(t["taskUUID"])]).json()["errors"][0]
        assert interrupted["code"] == "taskInterrupted"
        assert post(client, [t], AUTH_B).json()["errors"][0]["code"] == "invalidTaskUUID"  # not B's to resend
        answer = post(client, [t]).json()
        deadline = time.monotonic() + 10
        while answer["data"][0].get("status") != "success" and "imageBase64Data" not in answer["data"][0]:
            assert time.monotonic() < deadline, answer
            time.sleep(0.02)
            answer = post(client, [get_response(t["taskUUID"])]).json()
        items = answer["data"]
        assert [item["seed"] for item in items] == [6, 7]
        for index, item in enumerate(items):
            np.testing.assert_array_equal(decode(base64.b64decode(item["imageBase64Data"])), expected_pixels(t, index))
    assert "same taskUUID runs it anew" in interrupted["message"]  # the message says so


# --- 9. protocol details -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["inputs", "top"])
def test_referenceImages_that_is_not_a_list_is_an_error(client, where):
    value = data_uri(png_bytes())
    t = task(inputs={"referenceImages": value}) if where == "inputs" else task(referenceImages=value)
    error = post(client, [t]).json()["errors"][0]
    field = "inputs.referenceImages" if where == "inputs" else "referenceImages"
    assert (error["code"], error["parameter"], error["taskUUID"]) == ("invalidReferenceImages", field, t["taskUUID"])
    assert "must be a list" in error["message"]


def test_an_image_inference_reusing_an_upload_uuid_is_an_error_not_the_upload(client):
    sent = upload(data_uri(png_bytes()))
    (uploaded,) = post(client, [sent]).json()["data"]
    response = post(client, [task(taskUUID=sent["taskUUID"])])
    assert response.status_code == 400 and uploaded["imageUUID"] not in response.text
    error = response.json()["errors"][0]
    assert (error["code"], error["taskUUID"]) == ("invalidTaskUUID", sent["taskUUID"])


def test_seventy_invalid_tasks_in_one_body_each_get_their_own_error_not_429(client):
    tasks = [task(width=100) for _ in range(70)]
    response = post(client, tasks)
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert [e["taskUUID"] for e in errors] == [t["taskUUID"] for t in tasks]
    assert {e["code"] for e in errors} == {"invalidWidth"}


def test_fifty_thousand_unknown_fields_are_refused_before_validation(client):
    t = task(**{f"field{i}": i for i in range(50_000)})
    body = json.dumps([t])
    start = time.monotonic()
    response = client.post("/v1", content=body, headers={**AUTH_A, "content-type": "application/json"})
    elapsed = time.monotonic() - start
    (error,) = response.json()["errors"]
    assert (error["code"], error["taskUUID"]) == ("invalidRequestBody", t["taskUUID"])
    assert "50,006 fields; at most 256" in error["message"]  # the size rule, not 50,000 "unknown field" checks
    assert elapsed < 1.0, elapsed


def test_a_body_of_millions_of_small_values_is_refused_before_it_is_parsed(client):
    body = ("[" + ",".join(['{"a":1}'] * 3_000_000) + "]").encode()  # 24 MB, within the body limit
    start = time.monotonic()
    response = client.post("/v1", content=body, headers={**AUTH_A, "content-type": "application/json"})
    elapsed = time.monotonic() - start
    assert response.status_code == 413 and response.json()["errors"][0]["code"] == "requestTooLarge"
    assert "100,000 JSON values" in response.json()["errors"][0]["message"]
    assert elapsed < 2.0, elapsed  # parsing it alone held the event loop for ~1.4 s, answering it took minutes


# --- 10. runware-sdk's mediaStorage upload; serve refuses a model without weights ---------------------


def test_media_storage_upload_is_served_like_image_upload(client):
    raw = png_bytes(150)
    sent = {"taskType": "mediaStorage", "taskUUID": str(uuid.uuid4()), "operation": "upload", "media": data_uri(raw)}
    (item,) = post(client, [sent]).json()["data"]
    assert set(item) == {"taskType", "taskUUID", "operation", "mediaUUID", "mediaURL"}
    assert (item["taskType"], item["taskUUID"], item["operation"]) == ("mediaStorage", sent["taskUUID"], "upload")
    assert client.get(item["mediaURL"]).content == raw
    t = task(inputs={"referenceImages": [item["mediaUUID"]]}, seed=3, outputType="base64Data", outputFormat="PNG")
    reference = [np.asarray(decode(raw))]
    (out,) = post(client, [t]).json()["data"]
    np.testing.assert_array_equal(decode(base64.b64decode(out["imageBase64Data"])), expected_pixels(t, 0, reference))
    error = post(client, [{**sent, "taskUUID": str(uuid.uuid4()), "operation": "delete"}]).json()["errors"][0]
    assert (error["code"], error["parameter"]) == ("unsupportedOperation", "operation")


MEDIA_CLIENT = r'''
import asyncio, json, sys
from runware import Runware

cfg = json.loads(sys.stdin.read())

async def main():
    client = Runware(api_key=cfg["key"], transport=cfg["transport"], ws_base_url=cfg["ws"], http_base_url=cfg["http"])
    await client.connect()
    try:
        items = await client.media_storage({"operation": "upload", "media": cfg["media"]})
        print(json.dumps({"name": "media", "items": [dict(i) for i in items]}), flush=True)
    except Exception as err:
        print(json.dumps({"name": "media", "error": {"type": type(err).__name__, "message": str(err)}}), flush=True)
    finally:
        await client.close()

asyncio.run(asyncio.wait_for(main(), 60))
'''


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["rest", "websocket"])
def test_runware_sdk_media_storage_upload(tmp_path, transport):
    sdk_python("new")  # skips without the SDK venv
    raw = png_bytes(33)
    with uvicorn_serving(make_app(tmp_path / "data")) as url:
        cfg = {"key": KEY_A, "transport": transport, "ws": url.replace("http://", "ws://") + "/v1",
               "http": url + "/v1", "media": data_uri(raw)}
        answer = run_client("new", MEDIA_CLIENT, cfg, tmp_path)["media"]
        assert "items" in answer, answer
        (item,) = answer["items"]
        assert item["operation"] == "upload" and httpx.get(item["mediaURL"], timeout=10).content == raw


def test_serve_refuses_a_model_whose_weights_are_missing_as_run_does(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from flowgen.cli import main
    from flowgen.engine.catalog.cards import resolve_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("FLOWGEN_API_KEYS", KEY_A)
    result = CliRunner().invoke(main, ["serve", "--model", "runware:400@6", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: --model runware:400@6: {resolve_model('runware:400@6').missing_weights()}"]
    assert "hf download" in result.output


# --- 15. presigned URLs never reach the server's task records ---------------------------------------------


def test_presigned_upload_and_webhook_urls_are_stored_without_their_signatures(tmp_path, httpserver):
    from werkzeug import Response

    received = []
    httpserver.expect_request("/bucket/put.png", method="PUT").respond_with_handler(
        lambda request: received.append(request.args.get("X-Amz-Signature")) or Response("", status=200))
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    data = tmp_path / "data"
    app = make_app(data)
    with TestClient(app, base_url="http://testserver") as client:
        t = task(uploadEndpoint=httpserver.url_for("/bucket/put.png") + "?X-Amz-Signature=UPLOADSECRET42",
                 webhookURL=httpserver.url_for("/hook") + "?token=HOOKSECRET42")
        assert "data" in post(client, [t]).json()
        store = app.state.server.service.store
        deadline = time.monotonic() + 10
        while any(row["state"] == "pending" for row in store.deliveries(t["taskUUID"])):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        request = store.task(t["taskUUID"])["request"]
    assert received == ["UPLOADSECRET42"]  # sent as given
    assert request["uploadEndpoint"] == httpserver.url_for("/bucket/put.png")
    assert request["webhookURL"].startswith(httpserver.url_for("/")) and "?" not in request["webhookURL"]
    for path in data.rglob("*"):  # the database, its WAL, everything
        if path.is_file():
            assert b"UPLOADSECRET42" not in path.read_bytes() and b"HOOKSECRET42" not in path.read_bytes(), path


# --- 25. serve says when it stops --------------------------------------------------------------------


@pytest.mark.slow
def test_serve_prints_a_line_when_it_stops(tmp_path):
    server = ServeProcess(tmp_path / "data", free_port(), tmp_path / "serve.log").start()
    server.stop()
    lines = [line for line in (tmp_path / "serve.log").read_text().splitlines() if line.strip()]
    assert lines[0].startswith("flowgen serve: http://127.0.0.1:") and "models flowgen:1@1" in lines[0]
    assert lines[-1].startswith("flowgen serve: stopped"), lines
