from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import unquote

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from flowgen.delivery import put_file

BUCKET = "flowgen-test"
IMAGE = bytes(range(256)) * 40 + b"\x89PNG end"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback and a boto3 client for it, with dummy credentials."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        }.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            client = boto3.client(
                "s3",
                endpoint_url=f"http://{host}:{port}",
                region_name="us-east-1",
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
            )
            client.create_bucket(Bucket=BUCKET)
            yield client
        finally:
            server.stop()


def _presign_put(s3, key: str, content_type: str) -> str:
    return s3.generate_presigned_url(
        "put_object", Params={"Bucket": BUCKET, "Key": key, "ContentType": content_type}, ExpiresIn=300
    )


def test_put_to_presigned_s3_url(s3, client, policy, tmp_path):
    path = tmp_path / "result.png"
    path.write_bytes(IMAGE)
    url = _presign_put(s3, "generated/result.png", "image/png")
    assert "X-Amz-Signature=" in url

    delivery = put_file(client, url, path, content_type="image/png", policy=policy)

    assert delivery.ok, delivery.attempts
    assert delivery.method == "PUT" and delivery.status_code == 200
    obj = s3.get_object(Bucket=BUCKET, Key="generated/result.png")
    assert obj["Body"].read() == IMAGE
    assert obj["ContentType"] == "image/png"
    # The presigned credentials and signature are not in what gets recorded.
    assert delivery.url.endswith(f"/{BUCKET}/generated/result.png")
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    record = json.dumps(delivery.as_record())
    assert signature not in record and "X-Amz" not in record


def test_content_type_defaults_from_extension(s3, client, policy, tmp_path):
    path = tmp_path / "result.webp"
    path.write_bytes(b"RIFF....WEBPVP8 ")
    delivery = put_file(client, _presign_put(s3, "r.webp", "image/webp"), path, policy=policy)
    assert delivery.ok
    obj = s3.get_object(Bucket=BUCKET, Key="r.webp")
    assert obj["ContentType"] == "image/webp" and obj["Body"].read() == b"RIFF....WEBPVP8 "


def _sigv4_query_auth_ok(request, secret_key: str) -> bool:
    """S3's check of a presigned (query-auth) SigV4 request, as received: moto does not verify
    signatures, so this stands in for S3 and proves the bytes on the wire still match the URL's."""
    raw_path, _, raw_query = request.environ["REQUEST_URI"].partition("?")
    pairs = [item.partition("=")[::2] for item in raw_query.split("&")]
    params = {k: v for k, v in pairs}
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted(pairs) if k != "X-Amz-Signature")
    signed = unquote(params["X-Amz-SignedHeaders"]).split(";")
    canonical_headers = "".join(f"{name}:{request.headers.get(name, '').strip()}\n" for name in signed)
    canonical_request = "\n".join(
        [request.method, raw_path, canonical_query, canonical_headers, ";".join(signed), "UNSIGNED-PAYLOAD"]
    )
    _, date, region, service, terminator = unquote(params["X-Amz-Credential"]).split("/")
    scope = f"{date}/{region}/{service}/{terminator}"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, terminator):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, params["X-Amz-Signature"])


def test_presigned_signature_still_valid_on_the_wire(httpserver, client, policy, tmp_path):
    # boto3 presigns against the loopback server; whatever arrives must pass S3's signature check.
    presigner = boto3.client(
        "s3",
        endpoint_url=f"http://{httpserver.host}:{httpserver.port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    key = "generated/run 1/a+b (2).png"  # spaces, plus and parentheses: escapes must survive unchanged
    url = presigner.generate_presigned_url(
        "put_object", Params={"Bucket": BUCKET, "Key": key, "ContentType": "image/png"}, ExpiresIn=300
    )
    httpserver.expect_request(f"/{BUCKET}/{key}", method="PUT").respond_with_data("")
    path = tmp_path / "a.png"
    path.write_bytes(IMAGE)

    assert put_file(client, url, path, policy=policy).ok
    [(request, _)] = httpserver.log
    assert request.get_data() == IMAGE
    assert _sigv4_query_auth_ok(request, "testing")
    # The check can fail: a different Content-Type than the one presigned breaks the signature.
    httpserver.clear()
    httpserver.expect_request(f"/{BUCKET}/{key}", method="PUT").respond_with_data("")
    assert put_file(client, url, path, content_type="image/jpeg", policy=policy).ok
    [(request, _)] = httpserver.log
    assert not _sigv4_query_auth_ok(request, "testing")


def test_put_sends_url_unchanged_and_no_extra_signing_headers(httpserver, client, policy, tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(IMAGE)
    # A GCS-style signed URL with percent-escapes that must reach the server byte for byte.
    query = "X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam%2F20260101%2Fauto&X-Goog-Signature=ab12"
    httpserver.expect_request("/bucket/a.jpg", method="PUT").respond_with_data("")
    delivery = put_file(client, httpserver.url_for("/bucket/a.jpg") + "?" + query, path, policy=policy)

    assert delivery.ok
    [(request, _)] = httpserver.log
    assert request.query_string.decode() == query
    assert request.get_data() == IMAGE
    assert request.headers["Content-Type"] == "image/jpeg"
    assert request.headers["Content-Length"] == str(len(IMAGE))
    names = {name.lower() for name in request.headers.keys()}
    assert "authorization" not in names and "content-md5" not in names
    assert not any(name.startswith(("x-amz-", "x-goog-", "x-ms-")) for name in names)


def test_upload_retried_on_5xx(httpserver, client, policy, sleeps, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(IMAGE)
    httpserver.expect_oneshot_request("/u").respond_with_data("", status=500)
    httpserver.expect_oneshot_request("/u").respond_with_data("")
    delivery = put_file(client, httpserver.url_for("/u"), path, policy=policy)
    assert delivery.ok and [a.outcome for a in delivery.attempts] == ["retry", "ok"]
    assert [r.get_data() for r, _ in httpserver.log] == [IMAGE, IMAGE]


def test_upload_refuses_non_http(client, policy, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(IMAGE)
    with pytest.raises(ValueError, match="'s3'"):
        put_file(client, "s3://bucket/a.png", path, policy=policy)
