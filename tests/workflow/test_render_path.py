"""The render steps `flowgen run` and `flowgen serve` share (flowgen.run.render): one engine call padded to the
batch size with each image's batch record, and the per-image finish (face pass, content check, encode, cost)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flowgen.plan.job import Job
from flowgen.run.cost import RATE_ENV, cost_of
from flowgen.run.engine import BatchOutput, BatchRequest, FakeEngine
from flowgen.run.outputs import read_metadata
from flowgen.run.render import FacePassError, finish_image, render_batch

LORA = ("/loras/style.safetensors", "ab" * 32, 0.8)


def job(prompt: str, **task) -> Job:
    return Job.from_task({"positivePrompt": prompt, "width": 64, "height": 64, "steps": 2, **task}, guidance=None,
                         loras=[LORA])


def test_rows_are_padded_to_the_batch_size_and_each_image_gets_its_batch_record():
    engine = FakeEngine()
    rows = [(job("a fox"), 1, []), (job("a car"), 2, []), (job("a cat"), 3, [])]
    steps: list[int] = []
    rendered = render_batch(engine, rows, 4, on_step=steps.append)
    assert steps == [1, 2]  # each sampling step reported
    (call,) = engine.calls
    assert (call.prompts, call.seeds) == (["a fox", "a car", "a cat", "a cat"], [1, 2, 3, 3])  # copies of the last row
    assert rendered.size == 4 and len(rendered.images) == 4 and rendered.seconds_per_image == rendered.seconds / 4
    alone = FakeEngine().generate_batch(BatchRequest.for_jobs([rows[1]], 1)).images[0]
    assert np.array_equal(rendered.images[1], alone)  # the fake's rows do not depend on their neighbours
    assert rendered.batch_record(rows[1][0], 1) == {
        "size": 4, "position": 1, "guidance": None, "signature": rows[1][0].signature.label,
        "reference_layout": "none", "reference_length": 0,  # the engine's layout, without its own batch count
        "loras": [{"path": LORA[0], "sha256": LORA[1], "weight": LORA[2]}]}


def test_an_engine_that_returns_fewer_images_than_rows_fails_the_batch():
    class Short(FakeEngine):
        def generate_batch(self, request):
            return BatchOutput(super().generate_batch(request).images[:1])

    with pytest.raises(RuntimeError, match="returned 1 images for a batch of 2"):
        render_batch(Short(), [(job("a"), 1, []), (job("b"), 2, [])], 2)


class Checker:
    def __init__(self):
        self.seen: list[np.ndarray] = []

    def check(self, pixels):
        self.seen.append(np.array(pixels))
        return type("Verdict", (), {"nsfw": True})()


def test_the_finish_refines_faces_then_checks_and_encodes_what_was_refined(monkeypatch):
    monkeypatch.setenv(RATE_ENV, "0.5")
    monkeypatch.delenv("FLOWGEN_FACE_DETECTOR", raising=False)
    engine, checker = FakeEngine(), Checker()
    faced = job("a portrait", ultralytics={"confidence": 0.3}, outputFormat="PNG")
    pixels = FakeEngine().generate_batch(BatchRequest.for_jobs([(faced, 5, [])], 1)).images[0]
    image = finish_image(engine, faced, 5, pixels, ext="png", metadata={"item_id": "i", "result_index": 0},
                         engine_seconds=2.0, checker=checker, include_cost=True)
    (settings, seed), = engine.face_calls
    refined = FakeEngine().refine_faces(pixels, settings, 5).image
    assert seed == 5 and settings.confidence == 0.3 and settings.positive_prompt == "a portrait"
    assert np.array_equal(checker.seen[0], refined) and image.nsfw is True  # the check sees the refined image
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")), refined)
    assert image.faces["face_detector"] == {"detector": "fake"} and set(image.timings) == {"faces", "check", "encode"}
    assert image.cost == cost_of(2.0 + image.timings["faces"])  # the face pass is engine time too
    assert read_metadata(io.BytesIO(image.data)) == {"item_id": "i", "result_index": 0}


def test_a_failing_face_pass_is_one_images_error_and_no_check_runs_unasked():
    class Broken(FakeEngine):
        def refine_faces(self, *args, **kwargs):
            raise RuntimeError("detector exploded\nsecond line")

    faced = job("a portrait", ultralytics={})
    pixels = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(FacePassError, match=r"^face refinement error: RuntimeError: detector exploded$"):
        finish_image(Broken(), faced, 1, pixels, ext="jpg", metadata={}, engine_seconds=1.0)
    plain = finish_image(FakeEngine(), job("a car"), 1, pixels, ext="jpg", metadata={}, engine_seconds=1.0)
    assert (plain.verdict, plain.faces, plain.cost) == (None, None, None)
