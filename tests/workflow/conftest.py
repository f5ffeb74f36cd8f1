"""Shared by the workflow tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _loopback_receivers_allowed(monkeypatch):
    # Delivery receivers in these tests listen on loopback, which flowgen refuses unless the
    # operator allows it (flowgen.net.policy): the tests allow it as an operator would.
    monkeypatch.setenv("FLOWGEN_ALLOW_HOSTS", "127.0.0.1,::1,localhost")
