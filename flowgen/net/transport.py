"""httpx clients whose every connection is checked against a DestinationPolicy and bounded by a deadline.

The check sits where the socket is opened (an httpcore network backend), not on the URL: the host
is resolved once, each address is checked, and the socket connects to a checked address (never to
the name again, so DNS rebinding cannot swap in another address between check and connect). Every
redirect hop that opens a connection passes through here too. Environment proxies are not used:
through a proxy, the address connected to would be the proxy's, not the destination's.

httpx's timeouts are per operation: a server that drips its headers a byte at a time never trips
them. `time_limit(seconds)` sets a wall-clock deadline for whatever the calling thread does inside
it: resolving, connecting, TLS, writing and every read are given at most the time left, and fail
with httpx's own timeout errors once it is spent.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import httpcore
import httpx

from flowgen.net.policy import DestinationPolicy, DestinationRefused

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("flowgen_net_deadline", default=None)

# getaddrinfo cannot be interrupted: lookups run here so a caller stops waiting at its deadline (a
# hung lookup then holds one of these threads until the resolver's own timeout, not the caller).
_RESOLVER = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="flowgen-resolve")


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[float]:
    """A deadline `seconds` from now (or an enclosing one, if sooner) for the network I/O this
    thread does inside the block. Yields the deadline (time.monotonic() units)."""
    deadline = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(deadline if outer is None else min(outer, deadline))
    try:
        yield _deadline.get()  # type: ignore[misc]
    finally:
        _deadline.reset(token)


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """`timeout` cut to the time the deadline leaves; raises `error` once it is spent."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the time limit ran out")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """A socket stream whose every operation waits no longer than the deadline leaves."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """Resolve, check every address against the policy, connect to a checked address."""

    def __init__(self, policy: DestinationPolicy):
        self.policy = policy
        self._sync = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        allowed = [
            address
            for address in self._resolve(host, port, timeout)
            if self.policy.allows_name(host) or self.policy.allows_address(ipaddress.ip_address(address))
        ]
        if not allowed:
            raise DestinationRefused(host)
        error: Exception | None = None
        for address in allowed:  # as socket.create_connection would: the first that answers
            try:
                stream = self._sync.connect_tcp(
                    address, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                error = err
                continue
            return _Stream(stream)
        assert error is not None
        raise error

    def _resolve(self, host: str, port: int, timeout: float | None) -> list[str]:
        """The host's addresses, in getaddrinfo's order, without duplicates. A name that does not
        resolve reads as refused (an internal name's existence is not for a client to learn)."""
        literal = host.strip("[]")
        try:
            return [str(ipaddress.ip_address(literal))]
        except ValueError:
            pass
        lookup = _RESOLVER.submit(socket.getaddrinfo, literal, port, type=socket.SOCK_STREAM)
        try:
            infos = lookup.result(timeout=_left(timeout, httpcore.ConnectTimeout))
        except futures.TimeoutError:
            raise httpcore.ConnectTimeout("the host name was not resolved in time") from None
        except (OSError, UnicodeError):
            raise DestinationRefused(host) from None
        # an IPv6 scope (fe80::1%eth0) is not part of the address that is checked
        return list(dict.fromkeys(str(info[4][0]).partition("%")[0] for info in infos))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        raise DestinationRefused(path)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport (request mapping, errors, pooling) over the checking backend."""

    def __init__(self, policy: DestinationPolicy, limits: httpx.Limits | None = None):
        limits = limits or httpx.Limits()
        super().__init__(trust_env=False, limits=limits)
        # httpx builds its pool with httpcore's default backend and takes no other: rebuild it with ours
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Backend(policy),
        )


def guarded_client(policy: DestinationPolicy, *, max_connections: int = 10, **options: Any) -> httpx.Client:
    """An httpx.Client that connects only where `policy` allows, never follows redirects by itself
    (callers vet each hop) and ignores environment proxies."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.Client(transport=GuardedTransport(policy, limits), follow_redirects=False, trust_env=False, **options)
