"""Where flowgen connects (issue 18 items 2 and 4): public addresses unless the operator allows more,
checked on the address actually connected to (after DNS, on every redirect hop, pinned against
rebinding); one wall-clock deadline per request that a server dripping its headers cannot stretch.

Every server here listens on loopback and is started and stopped by its test.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import socket
import threading
import time

import pytest

from flowgen.delivery import RetryPolicy, make_client, post_result, send
from flowgen.delivery.pool import Lanes
from flowgen.net import (
    ALLOW_ENV,
    DestinationPolicy,
    FetchError,
    fetch_bytes,
    guarded_client,
    is_public,
    transport,
)
from flowgen.net.policy import AllowListError, DestinationRefused

INTERNAL = ["0.0.0.0", "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
            "100.64.0.1", "224.0.0.1", "255.255.255.255", "192.0.2.1", "240.0.0.1", "::", "::1", "fe80::1",
            "fc00::1", "fd12:3456::1", "ff02::1", "ff0e::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
            "2002:7f00:1::1", "64:ff9b::a9fe:a9fe"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2002:808:808::1", "64:ff9b::808:808"]


@pytest.fixture(autouse=True)
def _default_policy(monkeypatch):
    # these tests say what they allow; the conftest's loopback allowance is not assumed
    monkeypatch.delenv(ALLOW_ENV, raising=False)


@pytest.mark.parametrize("address", INTERNAL)
def test_internal_addresses_are_not_public(address):
    assert not is_public(ipaddress.ip_address(address))
    assert not DestinationPolicy().allows_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are(address):
    assert is_public(ipaddress.ip_address(address))


def test_the_allow_list_takes_names_wildcards_addresses_and_ranges_from_env_and_option():
    policy = DestinationPolicy.from_env(["minio, 192.168.0.0/16"], {ALLOW_ENV: "127.0.0.1,*.corp.example,[::1]"})
    assert policy.allows_name("MINIO") and policy.allows_name("a.b.corp.example") and not policy.allows_name("corp.example.org")
    assert not policy.allows_name("minio.evil.example")
    for allowed in ("127.0.0.1", "::1", "192.168.44.5"):
        assert policy.allows_address(ipaddress.ip_address(allowed))
    for refused in ("127.0.0.2", "10.0.0.1", "169.254.169.254"):
        assert not policy.allows_address(ipaddress.ip_address(refused))
    with pytest.raises(AllowListError) as err:
        DestinationPolicy.from_env(["ok-host", "bad host!"])
    assert str(err.value).startswith("--allow-host: 'bad host!' is not a host name")
    with pytest.raises(AllowListError, match=f"^{ALLOW_ENV}: 'a/b/c'"):
        DestinationPolicy.from_env(environ={ALLOW_ENV: "a/b/c"})


def test_literal_internal_hosts_are_refused_before_any_lookup():
    policy = DestinationPolicy.parse(["10.0.0.0/8"])
    assert policy.literal_problem("169.254.169.254").startswith("169.254.169.254: no public address")
    assert policy.literal_problem("[::1]") and policy.literal_problem("localhost") and policy.literal_problem("0.0.0.0")
    assert policy.literal_problem("10.1.1.1") is None and policy.literal_problem("example.com") is None


# --- servers -----------------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers GET /img with bytes, /redirect with a 302 to ?to=, POST with 200 / 307; records paths."""

    def do_GET(self):  # noqa: N802 - the http.server name
        self.server.paths.append(self.path)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"image bytes"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.server.paths.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/redirect"):
            self.send_response(307)
            self.send_header("Location", self.path.split("to=", 1)[1])
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class _Drip(http.server.BaseHTTPRequestHandler):
    """Sends its headers a byte every 50 ms for up to 20 s: each read gets a byte, so httpx's
    per-operation timeouts never fire."""

    def do_GET(self):  # noqa: N802
        self._drip()

    def do_POST(self):  # noqa: N802
        self._drip()

    def _drip(self):
        deadline = time.monotonic() + 20
        with contextlib.suppress(OSError):
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 1000:
                if time.monotonic() > deadline or self.server.stopping:
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler, host="127.0.0.1", port=0):
    server = http.server.ThreadingHTTPServer((host, port), handler)
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


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the destination check, where connections are made --------------------------------------------


def test_loopback_is_refused_by_default_by_address_and_by_name_and_nothing_is_sent():
    with serving(_Recorder) as server, guarded_client(DestinationPolicy()) as client:
        port = server.server_address[1]
        for host in ("127.0.0.1", "localhost"):
            with pytest.raises(FetchError, match=f"^{host}: no public address to connect to"):
                fetch_bytes(client, f"http://{host}:{port}/img", max_bytes=1000, timeout_s=5)
        assert server.paths == []


def test_an_open_and_a_closed_internal_port_read_the_same():
    policy = RetryPolicy(max_attempts=1, timeout_s=2)
    with serving(_Recorder) as server, guarded_client(DestinationPolicy()) as client, make_client() as sender:
        open_port, shut_port = server.server_address[1], closed_port()
        fetched, sent = [], []
        for port in (open_port, shut_port):
            with pytest.raises(FetchError) as err:
                fetch_bytes(client, f"http://127.0.0.1:{port}/img", max_bytes=1000, timeout_s=5)
            fetched.append(str(err.value))
            delivery = post_result(sender, f"http://127.0.0.1:{port}/hook", {"a": 1}, secret=None, policy=policy)
            sent.append((delivery.ok, [(a.status_code, a.error, a.outcome) for a in delivery.attempts]))
        assert fetched[0] == fetched[1] and sent[0] == sent[1]
        assert sent[0] == (False, [(None, fetched[0], "rejected")])  # refused once, not retried
        assert server.paths == []


def test_the_allow_list_opens_loopback_by_address_range_or_name(monkeypatch):
    with serving(_Recorder) as server:
        port = server.server_address[1]
        for entries, host in ((["127.0.0.1"], "127.0.0.1"), (["127.0.0.0/8"], "localhost"), (["localhost"], "localhost")):
            with guarded_client(DestinationPolicy.parse(entries)) as client:
                assert fetch_bytes(client, f"http://{host}:{port}/img", max_bytes=1000, timeout_s=5) == b"image bytes"
        monkeypatch.setenv(ALLOW_ENV, "127.0.0.1")  # deliveries read the environment
        with make_client() as sender:
            delivery = post_result(sender, f"http://127.0.0.1:{port}/hook", {"a": 1}, secret=None)
        assert delivery.ok and server.paths == ["/img"] * 3 + ["/hook"]


def test_a_redirect_to_a_destination_the_list_does_not_open_is_refused_at_that_hop():
    # the name `localhost` is allowed; the address the redirect names is not
    with serving(_Recorder) as server, guarded_client(DestinationPolicy.parse(["localhost"])) as client:
        port = server.server_address[1]
        inner = f"http://127.0.0.1:{port}/internal-only"
        with pytest.raises(FetchError, match="^127.0.0.1: no public address"):
            fetch_bytes(client, f"http://localhost:{port}/redirect?to={inner}", max_bytes=1000, timeout_s=5)
        policy = DestinationPolicy.parse(["localhost"])
        with make_client(destinations=policy) as sender:
            delivery = send(sender, "POST", f"http://localhost:{port}/redirect?to={inner}", content=b"{}",
                            policy=RetryPolicy(max_attempts=2, timeout_s=2))
        assert not delivery.ok and delivery.attempts[-1].outcome == "rejected"
        assert delivery.attempts[-1].error.startswith("127.0.0.1: no public address")
        assert [p.split("?")[0] for p in server.paths] == ["/redirect", "/redirect"]  # the inner URL never asked


def test_a_connection_goes_to_the_address_that_was_checked_not_to_a_second_lookup(monkeypatch):
    """DNS rebinding: the name first resolves to an allowed address, then to a forbidden one. The
    socket must connect to the address that was checked; a second lookup would reach the other."""
    with serving(_Recorder, host="127.0.0.2") as allowed, serving(_Recorder, "127.0.0.1", allowed.server_address[1]) as inner:
        port = allowed.server_address[1]
        answers = iter(["127.0.0.2"] + ["127.0.0.1"] * 10)
        lookups = []

        def rebinding(host, port_, *args, **kwargs):
            with contextlib.suppress(ValueError):  # a numeric host (the socket's own connect) is itself
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (str(ipaddress.ip_address(host)), port_))]
            lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port_))]

        monkeypatch.setattr(transport.socket, "getaddrinfo", rebinding)
        policy = DestinationPolicy.parse(["127.0.0.2"])
        with guarded_client(policy) as client:
            assert fetch_bytes(client, f"http://rebind.example:{port}/img", max_bytes=1000, timeout_s=5) == b"image bytes"
        assert lookups == ["rebind.example"] and allowed.paths == ["/img"] and inner.paths == []
        with guarded_client(policy) as client:  # a new connection is checked anew: now the name is refused
            with pytest.raises(FetchError, match="^rebind.example: no public address"):
                fetch_bytes(client, f"http://rebind.example:{port}/img", max_bytes=1000, timeout_s=5)
        assert inner.paths == []


def test_a_name_that_does_not_resolve_reads_as_refused():
    with guarded_client(DestinationPolicy()) as client:
        with pytest.raises(FetchError, match="^no-such-host.invalid: no public address"):
            fetch_bytes(client, "http://no-such-host.invalid/img", max_bytes=1000, timeout_s=5)


def test_unix_sockets_and_environment_proxies_are_not_used(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # would turn every request into one to the proxy
    with serving(_Recorder) as server, guarded_client(DestinationPolicy.parse(["127.0.0.1"])) as client:
        port = server.server_address[1]
        assert fetch_bytes(client, f"http://127.0.0.1:{port}/img", max_bytes=1000, timeout_s=5) == b"image bytes"
    with pytest.raises(DestinationRefused):
        transport._Backend(DestinationPolicy()).connect_unix_socket("/var/run/docker.sock")


# --- the deadline ------------------------------------------------------------------------------------


def test_a_fetch_from_a_server_dripping_its_headers_ends_at_the_deadline():
    with serving(_Drip) as server, guarded_client(DestinationPolicy.parse(["127.0.0.1"])) as client:
        start = time.monotonic()
        with pytest.raises(FetchError, match="^timed out: not fetched within 1 s"):
            fetch_bytes(client, f"http://127.0.0.1:{server.server_address[1]}/x", max_bytes=10_000, timeout_s=1.0)
        took = time.monotonic() - start
    assert 0.95 <= took < 1.5, took  # before: httpx's per-read timeout let it run 20 s


def test_a_tls_handshake_dripped_a_byte_at_a_time_ends_at_the_deadline():
    """A TLS record header announcing 16,000 bytes, then one byte every 50 ms: the handshake keeps
    reading; only the deadline stops it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        stop = threading.Event()

        def drip():
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"\x16\x03\x03\x3e\x80")
                while not stop.wait(0.05):
                    conn.sendall(b"\x00")

        thread = threading.Thread(target=drip, daemon=True)
        thread.start()
        start = time.monotonic()
        with guarded_client(DestinationPolicy.parse(["127.0.0.1"])) as client, pytest.raises(FetchError, match="^timed out"):
            fetch_bytes(client, f"https://127.0.0.1:{listener.getsockname()[1]}/x", max_bytes=100, timeout_s=1.0)
        took = time.monotonic() - start
        stop.set()
        thread.join(5)
    assert 0.95 <= took < 1.5, took


def test_a_delivery_attempt_to_a_dripping_server_ends_at_its_timeout(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "127.0.0.1")
    with serving(_Drip) as server, make_client() as client:
        delivery = send(client, "POST", f"http://127.0.0.1:{server.server_address[1]}/hook", content=b"{}",
                        policy=RetryPolicy(max_attempts=1, timeout_s=1.0))
    (attempt,) = delivery.attempts
    assert attempt.outcome == "gave_up" and attempt.error.startswith("ReadTimeout")
    assert 0.95 <= attempt.seconds < 1.5, attempt.seconds


# --- lanes: one stuck destination holds only its own --------------------------------------------------


def test_a_stuck_lane_holds_only_its_own_jobs():
    release, done = threading.Event(), []
    lanes = Lanes(max_workers=8)
    running = threading.Semaphore(0)

    def stuck():
        running.release()
        release.wait(10)
        done.append("stuck")

    for _ in range(5):
        lanes.submit(stuck, {"dead.example": 2, "key-a": 8})
    for i in range(3):
        lanes.submit(lambda i=i: done.append(f"other {i}"), {"alive.example": 2, "key-b": 8})
    assert running.acquire(timeout=5) and running.acquire(timeout=5)
    deadline = time.monotonic() + 5
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(done) == ["other 0", "other 1", "other 2"]  # not behind the stuck lane
    assert lanes.running("dead.example") == 2 and not running.acquire(timeout=0.2)  # its limit holds
    release.set()
    lanes.close()  # waits for the queued ones too
    assert done.count("stuck") == 5
