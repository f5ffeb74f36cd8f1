"""The `flowgen serve` app on the FakeEngine behind the real batcher, with one test key; a task for the tiny
model, PNG bytes to send, and the pixels FakeEngine renders for a task's result."""

from __future__ import annotations

import io
import threading
import uuid

import numpy as np
from PIL import Image

from flowgen.engine.catalog.cards import list_cards
from flowgen.plan.job import Job
from flowgen.plan.seeds import result_seed
from flowgen.run.engine import BatchRequest, FakeEngine
from flowgen.serve.app import create_app
from flowgen.serve.batcher import Batcher

KEY = "test-key-1"
TINY = "flowgen:1@1"
AUTH = {"Authorization": f"Bearer {KEY}"}


def tiny_card():
    return next(card for card in list_cards() if card.tiny is not None)


def make_app(data_dir, engine=None, **kwargs):
    engine = engine or FakeEngine()
    batcher = Batcher(lambda name: engine, window_s=0.01, max_batch=4)
    return create_app(batcher=batcher, data_dir=data_dir, models=[tiny_card()], keys=frozenset({KEY}), **kwargs)


def task(**fields):
    out = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": TINY,
           "positivePrompt": "a red fox in snow", "width": 256, "height": 256}
    out.update(fields)
    return out


def png_bytes(value: int = 120, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def expected_pixels(t: dict, index: int, references: list | None = None) -> np.ndarray:
    """What FakeEngine renders for this task's result `index` alone in a batch."""
    job = Job.from_task({**t, "steps": 4}, guidance=None)
    seed = result_seed(t.get("seed"), None, t["taskUUID"], index)
    rows = [(job, seed, references or [])]
    return FakeEngine().generate_batch(BatchRequest.for_jobs(rows, 1)).images[0]


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class GatedEngine(FakeEngine):
    """A FakeEngine whose calls wait until the test opens the gate."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def generate_batch(self, request):
        assert self.gate.wait(10), "the test never opened the gate"
        return super().generate_batch(request)
