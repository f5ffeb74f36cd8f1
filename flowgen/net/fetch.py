"""Fetching a URL a client named (a reference image): bounded in bytes, wall-clock time and number.

    fetch_bytes(client, url, max_bytes=..., timeout_s=...) -> bytes   # FetchError(one line) otherwise

`client` is a guarded_client (flowgen.net.transport): every connection, redirect hops included, goes
only where the destination policy allows. Redirects (301/302/303/307/308) are followed here, one hop
at a time, at most MAX_REDIRECTS, to http(s) only. The whole fetch (DNS, connect, TLS, headers,
body, every hop) shares one deadline of `timeout_s`; the body is read raw (identity encoding asked
for, so a small compressed body cannot inflate past `max_bytes` in memory).

FetchSlots caps the fetches one key has in flight, so one client cannot hold every thread that
fetches (or answers) with slow URLs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx

from flowgen.net.policy import DestinationRefused
from flowgen.net.redact import redact_url, scrub
from flowgen.net.transport import time_limit

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(Exception):
    """A fetch that did not give the body; the message is one line without the URL's secrets."""


class TooManyFetches(Exception):
    """The key already has its limit of fetches in flight."""


def fetch_bytes(client: httpx.Client, url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """The body of a 200 answer to GET `url`, at most `max_bytes`, within `timeout_s` in all."""
    try:
        with time_limit(timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                _check_scheme(url)
                with client.stream(
                    "GET", url, headers={"Accept-Encoding": "identity"}, timeout=timeout_s, follow_redirects=False
                ) as response:
                    location = response.headers.get("location")
                    if response.status_code in REDIRECTS and location:
                        url = str(response.url.join(location))
                        continue
                    if response.status_code != 200:
                        raise FetchError(f"answered HTTP {response.status_code}")
                    return _read(response, max_bytes)
            raise FetchError(f"more than {MAX_REDIRECTS} redirects")
    except httpx.TimeoutException:
        raise FetchError(
            f"timed out: not fetched within {timeout_s:g} s (connect, headers and body together)"
        ) from None
    except DestinationRefused as err:
        raise FetchError(str(err)) from None
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        reason = " ".join(scrub(str(err), url).split()) or type(err).__name__
        raise FetchError(f"cannot fetch it ({reason})") from None


def _check_scheme(url: str) -> None:
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise FetchError(f"redirected to a URL that is not http(s): {redact_url(url)}")


def _read(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"is larger than {max_bytes:,} bytes")
    chunks, size = [], 0
    for chunk in response.iter_raw(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(f"is larger than {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class FetchSlots:
    """At most `limit` fetches in flight per key; the one over the limit is refused at once (a
    caller that waited would hold its thread, which is what the limit is there to prevent)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the fetch limit must be >= 1, not {limit}")
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self, key: str) -> Iterator[None]:
        with self._lock:
            if self._counts.get(key, 0) >= self.limit:
                raise TooManyFetches(f"{self.limit} fetches already in flight")
            self._counts[key] = self._counts.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[key] -= 1
                if not self._counts[key]:
                    del self._counts[key]

    def in_flight(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)
