"""Shared by the serve tests: loopback allowed, and `client`, a TestClient on the fake app (tests/serve/fake_app.py)."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from tests.serve.fake_app import make_app


@pytest.fixture(autouse=True)
def _loopback_receivers_allowed(monkeypatch):
    # Reference-image servers and delivery receivers here listen on loopback, which flowgen refuses unless the
    # operator allows it (flowgen.net.policy): the tests allow it as an operator would.
    monkeypatch.setenv("FLOWGEN_ALLOW_HOSTS", "127.0.0.1,::1,localhost")


@pytest.fixture
def client(tmp_path):
    with TestClient(make_app(tmp_path / "data"), base_url="http://testserver") as client:
        yield client
