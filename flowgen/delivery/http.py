"""One HTTP request, retried with capped exponential backoff and full jitter, every attempt recorded.

Retried: timeouts, connection errors, 408, 429 and 5xx (a numeric Retry-After is honoured, capped
at `max_delay_s`). Any other non-2xx status is "rejected" at once. Redirects are followed only for
307/308 (which keep the method and body; a 301/302/303 would turn a POST or PUT into a GET), only
to http(s), never from https down to http, at most MAX_REDIRECTS hops within one attempt.

URLs are recorded as `scheme://host[:port]/path` (flowgen.net.redact; a webhook's without its
path): query strings carry presigned signatures and userinfo carries passwords, so neither ever
reaches a record or an error text.

The client must be a guarded one (flowgen.delivery.pool.make_client): every connection, redirect
hops included, goes only where the destination policy allows (public addresses unless the operator
allows more, flowgen.net.policy), and each attempt has a wall-clock deadline of `timeout_s` that a
server dripping its headers cannot stretch. A refused destination is "rejected" at once, with the
same message whatever listens there.
"""

from __future__ import annotations

import json
import math
import random as _random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from flowgen.net.policy import DestinationRefused
from flowgen.net.redact import redact_url, scrub
from flowgen.net.transport import time_limit

MAX_BODY_BYTES = 64 * 1024
MAX_REDIRECTS = 5
ALLOWED_SCHEMES = ("http", "https")

# Transient by nature; anything else httpx raises (a malformed request, say) is not worth repeating.
_RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)

Headers = Mapping[str, str] | Callable[[], Mapping[str, str]]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to try. `sleep` and `random` are injectable so tests need not wait."""

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    timeout_s: float = 30.0  # per attempt, wall clock: connect, send, wait and read the (capped) body
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    random: Callable[[], float] = field(default=_random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {self.max_attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("retry delays must be >= 0")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, not {self.timeout_s}")

    def backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 = the first retry)."""
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** min(retry - 1, 62))
        return self.random() * ceiling  # full jitter: spreads many clients retrying at once


DEFAULT_POLICY = RetryPolicy()


@dataclass(frozen=True)
class Attempt:
    number: int  # 1-based
    started_at: str  # ISO 8601 UTC
    seconds: float
    status_code: int | None  # None when no response came (timeout, connection error)
    error: str | None
    outcome: str  # "ok" | "retry" | "gave_up" | "rejected"


@dataclass
class Delivery:
    ok: bool
    method: str
    url: str  # redacted
    attempts: list[Attempt]
    # First MAX_BODY_BYTES of the last response body, raw (not decoded); kept out of as_record()
    # since an error body may echo request details.
    body: bytes = field(default=b"", repr=False)

    @property
    def status_code(self) -> int | None:
        return self.attempts[-1].status_code if self.attempts else None

    def as_record(self) -> dict[str, Any]:
        """JSON-ready summary for a manifest."""
        return {
            "ok": self.ok,
            "method": self.method,
            "url": self.url,
            "attempts": [asdict(a) for a in self.attempts],
        }


def check_url(url: str) -> None:
    """Raise ValueError unless `url` is an absolute http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        scheme = repr(parts.scheme) if parts.scheme else "no scheme"
        raise ValueError(f"delivery URLs must be http or https, got {scheme}: {redact_url(url)}")
    if not parts.hostname:
        raise ValueError(f"delivery URL has no host: {redact_url(url)}")


def encode_json(obj: Any) -> bytes:
    """Compact JSON with sorted keys: the exact bytes sent (and signed)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def send(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    content: bytes | None = None,
    json_body: Any = None,
    headers: Headers | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    redact: Callable[[str], str] = redact_url,
) -> Delivery:
    """Send one request with retries; never raises for HTTP or network failures (see Delivery.ok).

    `headers` may be a callable, called once per attempt (fresh webhook signatures on retries).
    `redact` is how the URL is recorded. Raises ValueError for a non-http(s) URL, before anything
    is sent.
    """
    check_url(url)
    if content is not None and json_body is not None:
        raise ValueError("pass content or json_body, not both")
    base_headers: dict[str, str] = {}
    if json_body is not None:
        content = encode_json(json_body)
        base_headers["Content-Type"] = "application/json"

    method = method.upper()
    attempts: list[Attempt] = []
    for number in range(1, policy.max_attempts + 1):
        started_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        t0 = time.monotonic()
        status: int | None = None
        retry_after: float | None = None
        body = b""
        extra = headers() if callable(headers) else headers
        try:
            status, reason, retry_after, body = _exchange(
                client, method, url, content, {**base_headers, **(extra or {})}, policy.timeout_s
            )
            if 200 <= status < 300:
                error, retryable = None, False
            else:
                error, retryable = f"HTTP {status} {reason}".rstrip(), _retryable_status(status)
        except _RETRYABLE_ERRORS as exc:
            error, retryable = _describe(exc, url), True
        except _Refused as exc:
            status, error, retryable = exc.status_code, str(exc), False
        except DestinationRefused as exc:  # before any connection: nothing about what listens there
            error, retryable = str(exc), False
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            error, retryable = _describe(exc, url), False
        seconds = round(time.monotonic() - t0, 6)

        if error is None:
            outcome = "ok"
        elif not retryable:
            outcome = "rejected"
        elif number == policy.max_attempts:
            outcome = "gave_up"
        else:
            outcome = "retry"
        attempts.append(Attempt(number, started_at, seconds, status, error, outcome))
        if outcome != "retry":
            break
        policy.sleep(policy.backoff(number, retry_after))

    return Delivery(attempts[-1].outcome == "ok", method, redact(url), attempts, body)


class _Refused(Exception):
    """A redirect we will not follow; the attempt is rejected with this message."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


def _exchange(
    client: httpx.Client, method: str, url: str, content: bytes | None, headers: dict[str, str], timeout_s: float
) -> tuple[int, str, float | None, bytes]:
    """One attempt: the request plus any 307/308 hops, all within `timeout_s` of wall-clock time
    (connect, headers and body of every hop). Returns (status, reason, retry_after, body)."""
    with time_limit(timeout_s):
        for _ in range(MAX_REDIRECTS + 1):
            # follow_redirects=False per request: whatever client we were handed, redirects are ours to vet.
            with client.stream(
                method, url, content=content, headers=headers, timeout=timeout_s, follow_redirects=False
            ) as response:
                body = _read_capped(response)
                location = response.headers.get("location")
                if response.status_code not in (307, 308) or location is None:
                    return response.status_code, response.reason_phrase, _retry_after(response), body
                target = str(response.url.join(location))
                _check_redirect(response.status_code, url, target)
                url = target
    raise _Refused(response.status_code, f"more than {MAX_REDIRECTS} redirects")


def _check_redirect(status: int, source: str, target: str) -> None:
    scheme = urlsplit(target).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise _Refused(status, f"HTTP {status} redirect to a {scheme or 'scheme-less'} URL refused")
    if scheme == "http" and urlsplit(source).scheme.lower() == "https":
        raise _Refused(status, f"HTTP {status} redirect from https to http refused: {redact_url(target)}")


def _read_capped(response: httpx.Response) -> bytes:
    """Up to MAX_BODY_BYTES of the raw body; the rest is never read (the connection is then dropped).
    A trickling body fails at the attempt's deadline (the transport's time_limit)."""
    chunks: list[bytes] = []
    size = 0
    # iter_raw, not iter_bytes: a small gzip body must not inflate past the cap in memory.
    for chunk in response.iter_raw(chunk_size=16 * 1024):
        chunks.append(chunk[: MAX_BODY_BYTES - size])
        size += len(chunks[-1])
        if size >= MAX_BODY_BYTES:
            break
    return b"".join(chunks)


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status <= 599


def _retry_after(response: httpx.Response) -> float | None:
    """A numeric Retry-After (seconds) on a retryable status; HTTP dates fall back to backoff."""
    value = response.headers.get("retry-after")
    if value is None or not _retryable_status(response.status_code):
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _describe(exc: Exception, url: str) -> str:
    """Exception text with the URL's secrets (query, userinfo) removed, should httpx have echoed them."""
    return scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), url)
