from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest

from flowgen.delivery import (
    SIGNATURE_HEADER,
    encode_json,
    image_result,
    post_result,
    sign,
    uuid_from_key,
    verify_signature,
    webhook_secret,
)

SECRET = b"whsec-test-0123456789"


def _payload() -> dict:
    return image_result(
        task_uuid=uuid_from_key("run/item-1"),
        image_uuid=uuid_from_key("run/item-1/0"),
        seed=1234,
        output_type="dataURI",
        image=b"\x89PNG fake",
        cost=0.0013,
        nsfw_content=False,
    )


def test_signed_webhook_as_received(httpserver, client, policy):
    httpserver.expect_request("/hook", method="POST").respond_with_data("thanks")
    payload = _payload()
    delivery = post_result(client, httpserver.url_for("/hook"), payload, secret=SECRET, policy=policy)

    assert delivery.ok
    [(request, _)] = httpserver.log
    body = request.get_data()
    assert json.loads(body) == payload
    assert body == encode_json(payload)  # compact, sorted: the exact bytes that were signed
    assert b" " not in body and list(json.loads(body)) == sorted(payload)
    assert request.headers["Content-Type"] == "application/json"
    header = request.headers[SIGNATURE_HEADER]
    assert verify_signature(body, header, SECRET)

    # Recompute independently of sign(): t=<unix>,v1=hex(hmac_sha256(secret, "<t>." + body)).
    fields = dict(part.split("=", 1) for part in header.split(","))
    assert abs(int(fields["t"]) - time.time()) < 10
    expected = hmac.new(SECRET, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert fields["v1"] == expected


def test_unsigned_without_secret(httpserver, client, policy):
    httpserver.expect_request("/hook").respond_with_data("")
    delivery = post_result(client, httpserver.url_for("/hook"), _payload(), secret=None, policy=policy)
    assert delivery.ok
    [(request, _)] = httpserver.log
    assert SIGNATURE_HEADER not in request.headers
    assert json.loads(request.get_data()) == _payload()


def test_every_attempt_is_signed(httpserver, client, policy):
    httpserver.expect_oneshot_request("/hook").respond_with_data("", status=503)
    httpserver.expect_oneshot_request("/hook").respond_with_data("")
    delivery = post_result(client, httpserver.url_for("/hook"), _payload(), secret=SECRET, policy=policy)
    assert delivery.ok and len(delivery.attempts) == 2
    for request, _ in httpserver.log:
        assert verify_signature(request.get_data(), request.headers[SIGNATURE_HEADER], SECRET)


def test_webhook_failure_is_recorded_not_raised(httpserver, client, policy):
    httpserver.expect_request("/hook").respond_with_data("gone", status=410)
    delivery = post_result(client, httpserver.url_for("/hook"), _payload(), secret=SECRET, policy=policy)
    assert not delivery.ok and delivery.attempts[-1].outcome == "rejected"


def test_verify_rejects_tampering_and_stale_signatures():
    body = encode_json({"a": 1})
    now = 1_800_000_000
    header = sign(body, SECRET, timestamp=now)
    assert verify_signature(body, header, SECRET, now=now)
    assert verify_signature(body, header, SECRET, now=now + 300)
    assert not verify_signature(body, header, SECRET, now=now + 301)
    assert not verify_signature(body, header, SECRET, now=now - 301)
    assert not verify_signature(body + b" ", header, SECRET, now=now)
    assert not verify_signature(body, header, b"other secret", now=now)
    # A replayed signature with a fresh timestamp does not verify: t is part of the MAC.
    v1 = header.split("v1=")[1]
    assert not verify_signature(body, f"t={now + 60},v1={v1}", SECRET, now=now + 60)


def test_verify_accepts_any_of_several_v1():
    body = b"{}"
    good = sign(body, SECRET, timestamp=100).split("v1=")[1]
    assert verify_signature(body, f"t=100,v1={'0' * 64},v1={good}", SECRET, now=100)


@pytest.mark.parametrize("header", ["", "garbage", "t=abc,v1=00", "v1=00", "t=100", "t=100,v1=ünï", "t=100;v1=00"])
def test_verify_malformed_headers(header):
    assert verify_signature(b"{}", header, SECRET, now=100) is False


def test_secret_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("FLOWGEN_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("FLOWGEN_WEBHOOK_SECRET_FILE", raising=False)
    assert webhook_secret() is None

    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"from-file\n")
    monkeypatch.setenv("FLOWGEN_WEBHOOK_SECRET_FILE", str(secret_file))
    assert webhook_secret() == b"from-file"  # the trailing newline is not part of the secret

    monkeypatch.setenv("FLOWGEN_WEBHOOK_SECRET", "from-env")
    assert webhook_secret() == b"from-env"  # the variable wins over the file


def test_secret_file_problems_are_errors(tmp_path):
    with pytest.raises(OSError):
        webhook_secret({"FLOWGEN_WEBHOOK_SECRET_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(ValueError, match="empty"):
        webhook_secret({"FLOWGEN_WEBHOOK_SECRET_FILE": str(tmp_path / "empty")})
    assert webhook_secret({"FLOWGEN_WEBHOOK_SECRET": ""}) is None
