"""Loopback servers and fast retry policies for the delivery tests."""

from __future__ import annotations

import pytest
from pytest_httpserver import HTTPServer

from flowgen.delivery import RetryPolicy, make_client


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch):
    # A proxy from the environment would turn loopback requests into proxy requests.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _loopback_receivers_allowed(monkeypatch):
    # The receivers here listen on loopback, which flowgen refuses unless the operator allows it.
    monkeypatch.setenv("FLOWGEN_ALLOW_HOSTS", "127.0.0.1,::1,localhost")


@pytest.fixture(scope="session")
def make_httpserver():
    # Overrides pytest-httpserver's server: threaded, so a handler still sleeping after a client
    # timeout does not hold up the retry.
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture
def client():
    with make_client() as c:
        yield c


class Sleeps(list):
    """A no-op `sleep` that remembers what it was asked to wait."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def policy(sleeps) -> RetryPolicy:
    """Defaults except: no real waiting, jitter pinned to its ceiling, short timeout."""
    return RetryPolicy(timeout_s=2.0, sleep=sleeps, random=lambda: 1.0)
