"""Every URL `flowgen serve` fetches or sends to (issue 18 items 2, 4, 5 and 15).

* Reference images, webhookURL and uploadEndpoint reach public addresses only unless the operator
  allows more (--allow-host / FLOWGEN_ALLOW_HOSTS): loopback, link-local, private ranges, 0.0.0.0
  are refused, by literal address at validation and by resolved address on every hop, with the
  same words whether or not anything listens there.
* A reference fetch ends at its deadline however slowly the server drips its headers, and one key
  has only so many fetches in flight.
* One key's dead uploadEndpoint holds neither another key's answers nor its own beyond a few seconds.
* The server's files hold no signature, token or webhook secret once the sinks are done.

Servers are started on loopback by each test; the engine is FakeEngine behind the real batcher.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
import uuid

import httpx
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient
from werkzeug import Response

from flowgen.cli import main
from flowgen.delivery.http import RetryPolicy
from flowgen.delivery.log import SinkState
from flowgen.delivery.sink_urls import FILE_NAME, SinkURLs
from flowgen.net import ALLOW_ENV, DestinationPolicy, transport
from flowgen.run.engine import FakeEngine
from flowgen.serve.app import create_app
from flowgen.serve.auth import key_digest
from flowgen.serve.batcher import Batcher
from flowgen.serve.inputs import InputLimits
from flowgen.serve.store import Store
from flowgen.serve.tasks import _stored_request
from tests.serve.fake_app import png_bytes, task, tiny_card

KEY_A, KEY_B = "urls-key-a", "urls-key-b"
AUTH_A, AUTH_B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
LOOPBACK = DestinationPolicy.parse(["127.0.0.1"])


def make_app(data_dir, destinations=None, **kwargs):
    engine = FakeEngine()
    batcher = Batcher(lambda name: engine, window_s=0.01, max_batch=4)
    return create_app(batcher=batcher, data_dir=data_dir, models=[tiny_card()], keys=frozenset({KEY_A, KEY_B}),
                      destinations=destinations, **kwargs)


@pytest.fixture(autouse=True)
def _default_policy(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)  # each test says what the operator allows


class Files(http.server.BaseHTTPRequestHandler):
    """GET /ref.png: a PNG; GET /redirect?to=URL: 302 there; records every path asked for."""

    def do_GET(self):  # noqa: N802 - the http.server name
        self.server.paths.append(self.path)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = png_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Drip(http.server.BaseHTTPRequestHandler):
    """Sends its headers a byte every 50 ms for up to 30 s (each read gets a byte)."""

    def do_GET(self):  # noqa: N802
        deadline = time.monotonic() + 30
        with contextlib.suppress(OSError):
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"x" * 1000:
                if time.monotonic() > deadline or self.server.stopping:
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)

    def log_message(self, *args):
        pass


class BlackHole(http.server.BaseHTTPRequestHandler):
    """Reads the request, then never answers (until the server stops)."""

    def do_PUT(self):  # noqa: N802
        self.server.paths.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        while not self.server.stopping:
            time.sleep(0.05)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.paths, server.stopping = [], False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping = True
        server.shutdown()
        server.server_close()
        thread.join(5)


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


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def error_of(client, t, auth=AUTH_A) -> dict:
    answer = client.post("/v1", json=[t], headers=auth).json()
    assert "errors" in answer, answer
    (error,) = answer["errors"]
    return error


def settled(store, task_uuid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        rows = store.deliveries(task_uuid)
        if rows and all(row["state"] != "pending" for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


# --- 4. internal destinations ------------------------------------------------------------------------


def test_reference_urls_to_internal_addresses_are_refused_alike_whether_a_port_is_open_or_closed(tmp_path):
    with serving(Files) as files, TestClient(make_app(tmp_path / "data")) as client:
        open_url = f"http://127.0.0.1:{files.server_address[1]}/ref.png"
        closed_url = f"http://127.0.0.1:{closed_port()}/ref.png"
        reasons = {}
        for url in (open_url, closed_url, f"http://localhost:{files.server_address[1]}/ref.png",
                    "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0:8080/x.png", "http://10.0.0.1/x.png",
                    "http://[::1]:8080/x.png", "http://[fd00::1]/x.png"):
            t = task(inputs={"referenceImages": [url]})
            error = error_of(client, t)
            assert (error["code"], error["parameter"], error["taskUUID"]) == (
                "invalidImage", "inputs.referenceImages[0]", t["taskUUID"])
            prefix = f"inputs.referenceImages[0]: {url}: "
            assert error["message"].startswith(prefix), error["message"]
            reasons[url] = error["message"][len(prefix):]
        assert reasons[open_url] == reasons[closed_url]  # nothing tells an open internal port from a closed one
        assert all("no public address to connect to" in reason for reason in reasons.values()), reasons
        assert files.paths == []  # nothing was ever asked of the internal server


def test_the_allow_list_opens_a_host_and_a_redirect_from_it_to_another_internal_address_is_refused(tmp_path):
    with serving(Files) as files:
        port = files.server_address[1]
        app = make_app(tmp_path / "data", destinations=DestinationPolicy.parse(["localhost"]))
        with TestClient(app) as client:
            answer = client.post("/v1", json=[task(inputs={"referenceImages": [f"http://localhost:{port}/ref.png"]})],
                                 headers=AUTH_A).json()
            assert "data" in answer, answer
            inner = f"http://127.0.0.1:{port}/internal-only.png"
            error = error_of(client, task(inputs={"referenceImages": [f"http://localhost:{port}/redirect?to={inner}"]}))
            assert error["message"].endswith("127.0.0.1: no public address to connect to (flowgen connects only to "
                                             "public internet addresses unless the operator allows the host: "
                                             "FLOWGEN_ALLOW_HOSTS or serve --allow-host)")
        assert [path.split("?")[0] for path in files.paths] == ["/ref.png", "/redirect"]  # never /internal-only


@pytest.mark.parametrize("field, url", [
    ("webhookURL", "http://169.254.169.254/latest/meta-data/iam/"),
    ("webhookURL", "http://localhost:9000/hook"),
    ("uploadEndpoint", "http://10.1.2.3/bucket/{imageUUID}.jpg"),
    ("uploadEndpoint", "http://0.0.0.0:9000/x.jpg"),
    ("uploadEndpoint", "http://[::1]:9000/x.jpg"),
])
def test_a_sink_at_a_literal_internal_address_is_refused_when_the_task_is_validated(tmp_path, field, url):
    with TestClient(make_app(tmp_path / "data")) as client:
        t = task(**{field: url})
        error = error_of(client, t)
    code = "invalid" + field[0].upper() + field[1:]
    assert (error["code"], error["parameter"], error["taskUUID"]) == (code, field, t["taskUUID"])
    assert error["message"].startswith(f"task.{field}: ") and "no public address to connect to" in error["message"]


def test_a_sink_whose_name_resolves_to_loopback_is_refused_when_sent_and_the_task_still_succeeds(
        tmp_path, httpserver, monkeypatch):
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    real = socket.getaddrinfo
    monkeypatch.setattr(transport.socket, "getaddrinfo", lambda host, *a, **k: real(
        "127.0.0.1" if host == "hooks.attacker.example" else host, *a, **k))
    app = make_app(tmp_path / "data")
    with TestClient(app) as client:
        t = task(webhookURL=f"http://hooks.attacker.example:{httpserver.port}/hook")
        assert "data" in client.post("/v1", json=[t], headers=AUTH_A).json()
        (row,) = settled(app.state.server.service.store, t["taskUUID"])
    assert (row["sink"], row["state"], row["attempts"]) == ("webhook", "failed", 1)
    assert row["error"].startswith("hooks.attacker.example: no public address to connect to")
    assert httpserver.log == []


def test_allow_host_opens_sinks_and_a_bad_entry_is_one_error_line(tmp_path, httpserver):
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    app = make_app(tmp_path / "data", destinations=DestinationPolicy.from_env(["127.0.0.0/8"], {}))
    with TestClient(app) as client:
        t = task(webhookURL=httpserver.url_for("/hook").replace("localhost", "127.0.0.1"))
        assert "data" in client.post("/v1", json=[t], headers=AUTH_A).json()
        (row,) = settled(app.state.server.service.store, t["taskUUID"])
    assert row["state"] == "ok" and len(httpserver.log) == 1
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "d"), "--model", "flowgen:1@1",
                                       "--allow-host", "10.0.0.0/8", "--allow-host", "no such host"])
    assert result.exit_code == 2
    assert result.output == ("error: --allow-host: 'no such host' is not a host name, an IP address or a CIDR range "
                             "(e.g. minio, *.corp.example, 127.0.0.1, 10.0.0.0/8)\n")


# --- 2. the fetch deadline and the per-key limit -------------------------------------------------------


def test_a_dripping_reference_is_cut_at_its_deadline_and_one_key_has_at_most_its_fetches(tmp_path):
    limits = InputLimits(fetch_timeout_s=1.0, max_fetches_per_key=2)
    with serving(Drip) as drip, uvicorn_serving(make_app(tmp_path / "data", LOOPBACK, input_limits=limits)) as url:
        slow = f"http://127.0.0.1:{drip.server_address[1]}/ref.png"
        answers: dict[int, tuple[float, dict]] = {}

        def send(n):
            start = time.monotonic()
            body = httpx.post(url + "/v1", headers=AUTH_A, timeout=30,
                              json=[task(inputs={"referenceImages": [slow]})]).json()
            answers[n] = (time.monotonic() - start, body["errors"][0])

        senders = [threading.Thread(target=send, args=(n,)) for n in range(4)]
        for sender in senders:
            sender.start()
        time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=10) as other:  # another key meanwhile: answered at once
            start = time.monotonic()
            pong = other.post("/v1", json=[{"taskType": "ping", "ping": True}], headers=AUTH_B).json()
            ping_s = time.monotonic() - start
        for sender in senders:
            sender.join(30)
    assert pong == {"data": [{"taskType": "ping", "pong": True}]} and ping_s < 0.5
    timed_out = sorted(s for s, e in answers.values() if e["code"] == "invalidImage")
    refused = sorted(s for s, e in answers.values() if e["code"] == "tooManyRequests")
    assert len(timed_out) == 2 and len(refused) == 2, answers
    assert all(0.95 <= s < 1.8 for s in timed_out), timed_out  # before: the drip's 30 s
    assert all(s < 0.9 for s in refused), refused  # refused at once, not queued behind the drips
    assert all("timed out: not fetched within 1 s" in e["message"] for _, e in answers.values()
               if e["code"] == "invalidImage")
    assert all(e["message"] == "inputs.referenceImages[0]: this API key already has 2 image URLs being fetched; "
               "send the task again when they are done" for _, e in answers.values() if e["code"] == "tooManyRequests")


# --- 5. a dead sink holds no one else -----------------------------------------------------------------


def test_one_keys_dead_upload_endpoint_delays_neither_another_keys_answers_nor_its_own_for_long(tmp_path, httpserver):
    httpserver.expect_request("/bucket/b.jpg", method="PUT").respond_with_data("")
    app = make_app(tmp_path / "data", LOOPBACK)
    deliveries = app.state.server.service.deliveries
    deliveries.policy = RetryPolicy(max_attempts=1, timeout_s=20, sleep=lambda s: None)
    deliveries.upload_wait_s = 1.0
    with serving(BlackHole) as hole, uvicorn_serving(app) as url:
        dead = f"http://127.0.0.1:{hole.server_address[1]}/bucket/" + "{imageUUID}.jpg"
        answers_a: list[tuple[float, dict]] = []

        def send_a():
            start = time.monotonic()
            body = httpx.post(url + "/v1", headers=AUTH_A, timeout=60, json=[task(uploadEndpoint=dead)]).json()
            answers_a.append((time.monotonic() - start, body))

        senders = [threading.Thread(target=send_a) for _ in range(6)]  # more than the old 4 shared threads
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 10
        while len(hole.paths) < 4 and time.monotonic() < deadline:  # the dead sink holds its lane
            time.sleep(0.02)
        start = time.monotonic()
        b = httpx.post(url + "/v1", headers=AUTH_B, timeout=60,
                       json=[task(uploadEndpoint=httpserver.url_for("/bucket/b.jpg").replace("localhost", "127.0.0.1"))]
                       ).json()
        b_seconds = time.monotonic() - start
        for sender in senders:
            sender.join(30)
        hole.stopping = True  # lets the held uploads end, so the server can stop
    assert b_seconds < 1.0, b_seconds  # before: behind key A's uploads until they gave up (20 s)
    assert b["data"][0]["imageURL"] == httpserver.url_for("/bucket/b.jpg").replace("localhost", "127.0.0.1")
    assert len(answers_a) == 6
    for seconds, body in answers_a:  # answered once the image exists, without the upload's URL
        assert "data" in body and seconds < 3.0, (seconds, body)
        assert body["data"][0]["imageURL"].startswith(url + "/v1/images/")


# --- 15. no secret in the server's files ---------------------------------------------------------------


def test_the_servers_files_hold_no_webhook_secret_or_signature_once_sinks_are_done(tmp_path, httpserver):
    hooks = []
    httpserver.expect_request("/services/T0/B0/PATHSECRET12345", method="POST").respond_with_handler(
        lambda r: hooks.append(r.path) or Response("ok"))
    httpserver.expect_request("/bucket/x.jpg", method="PUT").respond_with_data("")
    data = tmp_path / "data"
    app = make_app(data, LOOPBACK)
    base = f"http://127.0.0.1:{httpserver.port}"
    with TestClient(app) as client:
        t = task(webhookURL=f"{base}/services/T0/B0/PATHSECRET12345",
                 uploadEndpoint=f"{base}/bucket/x.jpg?X-Amz-Signature=SIGSECRET12345")
        assert "data" in client.post("/v1", json=[t], headers=AUTH_A).json()
        rows = settled(app.state.server.service.store, t["taskUUID"])
        request = app.state.server.service.store.task(t["taskUUID"])["request"]
    assert sorted((r["sink"], r["state"]) for r in rows) == [("upload", "ok"), ("webhook", "ok")]
    assert hooks == ["/services/T0/B0/PATHSECRET12345"]
    assert request["webhookURL"] == f"{base}/..." and request["uploadEndpoint"] == f"{base}/bucket/x.jpg"
    for path in data.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"PATHSECRET12345" not in content and b"SIGSECRET12345" not in content, path


def test_a_restarted_server_resends_a_pending_sink_to_its_url_as_given_then_forgets_it(tmp_path, httpserver):
    tokens = []
    httpserver.expect_request("/hook", method="POST").respond_with_handler(
        lambda r: tokens.append(r.args.get("token")) or Response("ok"))
    data = tmp_path / "data"
    hook = f"http://127.0.0.1:{httpserver.port}/hook?token=TOKEN12345"
    task_uuid = str(uuid.uuid4())
    store = Store(data)  # a server that stored a result, kept its URLs, and died before the webhook went out
    image = store.put_image(png_bytes(), "png", owner=key_digest(KEY_A))
    store.accept(task_uuid, "imageInference", _stored_request({"outputType": "URL", "ext": "png", "webhookURL": hook,
                                                               "baseURL": "http://127.0.0.1:8080"}), 1,
                 key_digest(KEY_A))
    store.add_result(task_uuid, 0, image.image_uuid, 7, None, sinks=[SinkState(task_uuid, 0, "webhook", "pending")])
    store.close()
    side = SinkURLs(data / FILE_NAME)
    side.keep([(task_uuid, 0, None, hook)])
    side.close()
    assert (data / FILE_NAME).stat().st_mode & 0o777 == 0o600
    app = make_app(data, LOOPBACK)
    with TestClient(app):
        (row,) = settled(app.state.server.service.store, task_uuid)
    assert (row["state"], row["attempts"]) == ("ok", 1) and tokens == ["TOKEN12345"]
    assert not any(b"TOKEN12345" in p.read_bytes() for p in data.rglob("*") if p.is_file())
