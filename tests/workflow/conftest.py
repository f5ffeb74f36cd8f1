"""Shared by the workflow tests: loopback allowed, and `engine`, `flowgen run` rendering with a FakeEngine
that notes every prompt. Plain helpers: direct_runs.py, incremental_recipe.py, fake_clock.py."""

from __future__ import annotations

import pytest

from flowgen.run.engine import FakeEngine


@pytest.fixture(autouse=True)
def _loopback_receivers_allowed(monkeypatch):
    # Delivery receivers in these tests listen on loopback, which flowgen refuses unless the
    # operator allows it (flowgen.net.policy): the tests allow it as an operator would.
    monkeypatch.setenv("FLOWGEN_ALLOW_HOSTS", "127.0.0.1,::1,localhost")


class RecordingEngine(FakeEngine):
    """FakeEngine in PipelineEngine's place (same constructor); every prompt rendered is noted."""

    load_seconds = 0.0
    prompts: list[str] = []

    def __init__(self, model=None, dtype="float32"):
        super().__init__(dtype=dtype)

    def generate_batch(self, request):
        output = super().generate_batch(request)
        RecordingEngine.prompts.extend(request.prompts)
        return output


@pytest.fixture
def engine(monkeypatch):
    """`flowgen run`'s engine replaced by RecordingEngine; returns the list of prompts it rendered."""
    RecordingEngine.prompts = []
    monkeypatch.setattr("flowgen.commands.run.PipelineEngine", RecordingEngine)
    return RecordingEngine.prompts
