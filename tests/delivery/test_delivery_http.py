from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime

import pytest
from werkzeug import Response

from flowgen.delivery import MAX_BODY_BYTES, RetryPolicy, redact_url, send


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ok_first_try(httpserver, client, policy, sleeps):
    httpserver.expect_request("/x", method="POST").respond_with_data("fine")
    delivery = send(client, "post", httpserver.url_for("/x"), json_body={"b": 1, "a": [2]}, policy=policy)

    assert delivery.ok and delivery.method == "POST" and delivery.status_code == 200
    assert delivery.body == b"fine"
    [attempt] = delivery.attempts
    assert (attempt.number, attempt.status_code, attempt.error, attempt.outcome) == (1, 200, None, "ok")
    started = datetime.fromisoformat(attempt.started_at.replace("Z", "+00:00"))
    assert started.tzinfo is not None and started.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - started).total_seconds()) < 10
    assert 0 <= attempt.seconds < 2
    [(request, _)] = httpserver.log
    assert request.data == b'{"a":[2],"b":1}'
    assert request.headers["Content-Type"] == "application/json"
    assert sleeps == []


def test_retries_500_then_succeeds(httpserver, client, policy, sleeps):
    httpserver.expect_oneshot_request("/x").respond_with_data("boom", status=500)
    httpserver.expect_oneshot_request("/x").respond_with_data("boom", status=502)
    httpserver.expect_oneshot_request("/x").respond_with_data("ok")
    delivery = send(client, "POST", httpserver.url_for("/x"), content=b"payload", policy=policy)

    assert delivery.ok
    assert [a.outcome for a in delivery.attempts] == ["retry", "retry", "ok"]
    assert [a.status_code for a in delivery.attempts] == [500, 502, 200]
    assert delivery.attempts[0].error == "HTTP 500 INTERNAL SERVER ERROR"
    assert [a.number for a in delivery.attempts] == [1, 2, 3]
    assert sleeps == [0.5, 1.0]  # base 0.5 doubling, jitter pinned at its ceiling
    assert [r.data for r, _ in httpserver.log] == [b"payload"] * 3  # same body every time


def test_timeout_is_retried(httpserver, client, sleeps):
    calls = []

    def handler(request):
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(0.6)  # far past the 0.2 s timeout
        return Response("late or not")

    httpserver.expect_request("/slow").respond_with_handler(handler)
    policy = RetryPolicy(timeout_s=0.2, sleep=sleeps, random=lambda: 0.0)
    t0 = time.monotonic()
    delivery = send(client, "POST", httpserver.url_for("/slow"), content=b"x", policy=policy)

    assert delivery.ok
    first, second = delivery.attempts
    assert first.outcome == "retry" and first.status_code is None
    assert "Timeout" in first.error
    assert first.seconds < 0.5  # the client gave up; it did not wait for the handler
    assert second.outcome == "ok"
    assert time.monotonic() - t0 < 0.55
    assert len(calls) == 2
    # Let the abandoned handler finish (and log) before the next test reuses the server.
    deadline = time.monotonic() + 3
    while len(httpserver.log) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)


def test_connection_error_is_retried_then_gives_up(client, policy, sleeps):
    url = f"http://127.0.0.1:{_free_port()}/hook?token=s3cr3t"
    delivery = send(client, "POST", url, content=b"x", policy=policy)

    assert not delivery.ok
    assert [a.outcome for a in delivery.attempts] == ["retry"] * 4 + ["gave_up"]
    assert all(a.status_code is None and "ConnectError" in a.error for a in delivery.attempts)
    assert "s3cr3t" not in json.dumps(delivery.as_record())
    assert len(sleeps) == 4


def test_429_honours_retry_after(httpserver, client, policy, sleeps):
    httpserver.expect_oneshot_request("/x").respond_with_data("slow down", status=429, headers={"Retry-After": "7"})
    httpserver.expect_oneshot_request("/x").respond_with_data("slow down", status=429, headers={"Retry-After": "3600"})
    httpserver.expect_oneshot_request("/x").respond_with_data(
        "slow down", status=429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    )
    httpserver.expect_oneshot_request("/x").respond_with_data("ok")
    delivery = send(client, "POST", httpserver.url_for("/x"), content=b"x", policy=policy)

    assert delivery.ok
    assert [a.status_code for a in delivery.attempts] == [429, 429, 429, 200]
    # 7 s as asked; 3600 s capped at max_delay_s; an HTTP date falls back to backoff (3rd retry: 2 s).
    assert sleeps == [7.0, 30.0, 2.0]


def test_gives_up_after_max_attempts(httpserver, client, sleeps):
    httpserver.expect_request("/x").respond_with_data("down", status=503)
    policy = RetryPolicy(max_attempts=3, sleep=sleeps, random=lambda: 1.0)
    delivery = send(client, "PUT", httpserver.url_for("/x"), content=b"x", policy=policy)

    assert not delivery.ok
    assert [a.outcome for a in delivery.attempts] == ["retry", "retry", "gave_up"]
    assert [a.status_code for a in delivery.attempts] == [503] * 3
    assert len(httpserver.log) == 3
    assert len(sleeps) == 2  # no pointless wait after the last attempt


def test_408_is_retried(httpserver, client, policy):
    httpserver.expect_oneshot_request("/x").respond_with_data("", status=408)
    httpserver.expect_oneshot_request("/x").respond_with_data("ok")
    delivery = send(client, "POST", httpserver.url_for("/x"), content=b"x", policy=policy)
    assert delivery.ok and [a.outcome for a in delivery.attempts] == ["retry", "ok"]


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_other_4xx_rejected_without_retry(httpserver, client, policy, sleeps, status):
    httpserver.expect_request("/x").respond_with_data("no", status=status)
    delivery = send(client, "POST", httpserver.url_for("/x"), content=b"x", policy=policy)

    assert not delivery.ok
    [attempt] = delivery.attempts
    assert attempt.outcome == "rejected" and attempt.status_code == status
    assert attempt.error.startswith(f"HTTP {status}")
    assert len(httpserver.log) == 1
    assert sleeps == []


def test_query_string_and_userinfo_never_recorded(httpserver, client, policy):
    httpserver.expect_request("/bucket/key.png").respond_with_data("no", status=403)
    secret_url = httpserver.url_for("/bucket/key.png?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAXYZ")
    secret_url = secret_url.replace("http://", "http://user:hunter2@")
    delivery = send(client, "PUT", secret_url, content=b"x", policy=policy)

    host = f"{httpserver.host}:{httpserver.port}"
    assert delivery.url == f"http://{host}/bucket/key.png"
    record = json.dumps(delivery.as_record())
    for secret in ("deadbeef", "AKIAXYZ", "hunter2", "X-Amz"):
        assert secret not in record
        assert secret not in repr(delivery)
    # ...but the request itself went out with the query intact.
    [(request, _)] = httpserver.log
    assert request.query_string == b"X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAXYZ"


def test_redact_url():
    assert redact_url("https://u:p@h.example:8443/a/b.png?sig=1#frag") == "https://h.example:8443/a/b.png"
    assert redact_url("https://storage.googleapis.com/b/c.jpg?X-Goog-Signature=xyz") == (
        "https://storage.googleapis.com/b/c.jpg"
    )


@pytest.mark.parametrize(
    "url, scheme",
    [("ftp://h/x", "'ftp'"), ("file:///etc/passwd", "'file'"), ("javascript:alert(1)", "'javascript'"),
     ("example.com/hook", "no scheme")],
)
def test_non_http_url_refused(httpserver, client, policy, url, scheme):
    with pytest.raises(ValueError, match=scheme):
        send(client, "POST", url, content=b"x", policy=policy)
    assert httpserver.log == []


def test_url_without_host_refused(client, policy):
    with pytest.raises(ValueError, match="no host"):
        send(client, "POST", "http:///path", content=b"x", policy=policy)


def test_content_and_json_body_exclusive(client, policy):
    with pytest.raises(ValueError, match="not both"):
        send(client, "POST", "http://127.0.0.1/x", content=b"x", json_body={}, policy=policy)


def test_307_followed_with_method_and_body(httpserver, client, policy):
    httpserver.expect_request("/old", method="PUT").respond_with_data(
        "", status=307, headers={"Location": "/new?sig=abc"}
    )
    httpserver.expect_request("/new", method="PUT").respond_with_data("stored")
    delivery = send(client, "PUT", httpserver.url_for("/old"), content=b"image", policy=policy)

    assert delivery.ok and delivery.body == b"stored"
    assert len(delivery.attempts) == 1
    sent = [(r.method, r.path, r.data) for r, _ in httpserver.log]
    assert sent == [("PUT", "/old", b"image"), ("PUT", "/new", b"image")]


@pytest.mark.parametrize(
    "status, location, message",
    [(302, "/new", "HTTP 302"), (301, "/new", "HTTP 301"), (307, "ftp://h/x", "ftp URL refused"),
     (308, "file:///etc/passwd", "file URL refused"), (307, "https://127.0.0.1:1/x", None)],
)
def test_redirects_not_followed(httpserver, client, policy, sleeps, status, location, message):
    httpserver.expect_request("/old").respond_with_data("", status=status, headers={"Location": location})
    httpserver.expect_request("/new").respond_with_data("should not be reached")
    delivery = send(client, "POST", httpserver.url_for("/old"), content=b"x", policy=policy)

    if message is None:  # an https target is allowed, it just cannot be reached here
        assert not delivery.ok and "ConnectError" in delivery.attempts[0].error
        return
    assert not delivery.ok
    [attempt] = delivery.attempts
    assert attempt.outcome == "rejected" and attempt.status_code == status and message in attempt.error
    assert [r.path for r, _ in httpserver.log] == ["/old"]
    assert sleeps == []


def test_redirect_loop_rejected(httpserver, client, policy):
    httpserver.expect_request("/loop").respond_with_data("", status=307, headers={"Location": "/loop"})
    delivery = send(client, "POST", httpserver.url_for("/loop"), content=b"x", policy=policy)
    assert not delivery.ok and delivery.attempts[0].outcome == "rejected"
    assert "more than 5 redirects" in delivery.attempts[0].error
    assert len(httpserver.log) == 6


def test_response_body_capped(httpserver, client, policy):
    httpserver.expect_request("/big").respond_with_data(b"z" * (4 * MAX_BODY_BYTES))
    delivery = send(client, "POST", httpserver.url_for("/big"), content=b"x", policy=policy)
    assert delivery.ok and delivery.body == b"z" * MAX_BODY_BYTES


def test_headers_callable_runs_per_attempt(httpserver, client, policy):
    httpserver.expect_oneshot_request("/x").respond_with_data("", status=500)
    httpserver.expect_oneshot_request("/x").respond_with_data("ok")
    counter = iter(range(100))
    delivery = send(
        client, "POST", httpserver.url_for("/x"), content=b"x", headers=lambda: {"X-N": str(next(counter))},
        policy=policy,
    )
    assert delivery.ok
    assert [r.headers["X-N"] for r, _ in httpserver.log] == ["0", "1"]


def test_backoff_full_jitter_and_cap():
    policy = RetryPolicy(random=lambda: 1.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 7, 8, 500)] == [0.5, 1.0, 2.0, 30.0, 30.0, 30.0]
    assert RetryPolicy(random=lambda: 0.25).backoff(3) == 0.5
    assert policy.backoff(1, retry_after=0.0) == 0.0
    values = {RetryPolicy().backoff(4) for _ in range(50)}
    assert len(values) > 1 and all(0 <= v <= 4.0 for v in values)


def test_policy_validation():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(timeout_s=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay_s=-1)


def test_default_policy():
    # The defaults the brief fixes; a change here is a behaviour change for every run.
    p = RetryPolicy()
    assert (p.max_attempts, p.base_delay_s, p.max_delay_s, p.timeout_s) == (5, 0.5, 30.0, 30.0)
    assert p.sleep is time.sleep
