"""webhookURL: POST one result as JSON, optionally signed with HMAC-SHA256.

Signature header (when a secret is configured), Stripe-style so receivers can reject replays:

    X-Flowgen-Signature: t=<unix seconds>,v1=<hex hmac_sha256(secret, f"{t}.".encode() + body)>

`body` is the exact request body: compact JSON with sorted keys. Each attempt is signed afresh, so
a retry late in the backoff still falls inside the receiver's tolerance window.

The secret comes from the environment, never from a recipe (recipes get shared and committed):
FLOWGEN_WEBHOOK_SECRET, or else the file named by FLOWGEN_WEBHOOK_SECRET_FILE.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from flowgen.delivery.http import DEFAULT_POLICY, Delivery, RetryPolicy, encode_json, send
from flowgen.net.redact import redact_webhook_url

SIGNATURE_HEADER = "X-Flowgen-Signature"
SECRET_ENV = "FLOWGEN_WEBHOOK_SECRET"
SECRET_FILE_ENV = "FLOWGEN_WEBHOOK_SECRET_FILE"


def webhook_secret(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The signing secret: $FLOWGEN_WEBHOOK_SECRET, else the contents of $FLOWGEN_WEBHOOK_SECRET_FILE
    (surrounding whitespace stripped: files usually end in a newline), else None.

    Raises OSError when the named file cannot be read: a configured but missing secret must not
    silently turn into unsigned webhooks.
    """
    env = os.environ if environ is None else environ
    value = env.get(SECRET_ENV)
    if value:
        return value.encode("utf-8")
    path = env.get(SECRET_FILE_ENV)
    if path:
        secret = Path(path).read_bytes().strip()
        if not secret:
            raise ValueError(f"{SECRET_FILE_ENV} names an empty file: {path}")
        return secret
    return None


def sign(body: bytes, secret: bytes, timestamp: int | None = None) -> str:
    """The X-Flowgen-Signature value for `body` at `timestamp` (default: now)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_mac(secret, t, body)}"


def verify_signature(
    body: bytes, header: str, secret: bytes, tolerance_s: float = 300, *, now: float | None = None
) -> bool:
    """True when `header` signs `body` with `secret` and its timestamp is within `tolerance_s` of now.

    Any v1 entry may match (a sender rotating secrets can send several). Malformed headers are False.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body).encode()
    # compare_digest on every candidate (bytes: str would raise on non-ASCII input): constant time,
    # and no early exit that would leak which one matched.
    return any([hmac.compare_digest(expected, c.encode("utf-8", "replace")) for c in candidates])


def post_result(
    client: httpx.Client,
    url: str,
    payload: dict[str, Any],
    *,
    secret: bytes | None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Delivery:
    """POST `payload` to the webhook URL with retries; signed when `secret` is not None."""
    body = encode_json(payload)
    headers: Callable[[], dict[str, str]] | dict[str, str]
    if secret is None:
        headers = {"Content-Type": "application/json"}
    else:
        headers = lambda: {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)}  # noqa: E731
    # recorded as scheme://host/...: a webhook URL's path may be its secret (Slack, Discord)
    return send(client, "POST", url, content=body, headers=headers, policy=policy, redact=redact_webhook_url)


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
