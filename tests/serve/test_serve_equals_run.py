"""A served image is the image `flowgen run` renders: the same imageInference sent to `flowgen serve` and written
as a one-item recipe, at the same seed and batch size, gives byte-identical pixels (both go through one render path,
flowgen.run.render: the engine call, the face pass, the encode)."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from starlette.testclient import TestClient

from flowgen.plan.from_recipe import plan_recipe
from flowgen.run.engine import FakeEngine, PipelineEngine
from flowgen.run.executor import against_folder, execute
from flowgen.serve.app import create_app
from flowgen.serve.batcher import Batcher
from tests.png_files import solid_png
from tests.serve.fake_app import AUTH, KEY, TINY, decode, tiny_card


def served(engine, data_dir: Path, fields: dict) -> list[dict]:
    """The task's results as the server answers them (base64 files), in seed order. The batcher
    waits long enough for a task's results to share one engine call, as a recipe item's do."""
    batcher = Batcher(lambda name: engine, window_s=0.5, max_batch=4)
    app = create_app(batcher=batcher, data_dir=data_dir, models=[tiny_card()], keys=frozenset({KEY}))
    task = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": TINY, "outputType": "base64Data",
            **fields}
    with TestClient(app, base_url="http://testserver") as client:
        answer = client.post("/v1", json=[task], headers=AUTH).json()
    assert "data" in answer, answer
    return sorted(answer["data"], key=lambda item: item["seed"])


def run(engine, folder: Path, fields: dict) -> list[tuple[int, bytes]]:
    """(seed, file bytes) of each result of a one-item recipe with these task fields, run by `flowgen run`'s executor."""
    recipe = folder / "one.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "name": "one", "model": "flux2-klein-tiny", "task": fields,
                                      "output": {"dir": "out", "filename": "{result}.{ext}"}}))
    plan = plan_recipe(recipe, folder / "out", max_batch=4)
    summary = execute(against_folder(plan), engine)
    assert (summary.rendered, summary.failed) == (len(plan.results), 0)
    return [(r.seed, Path(r.output_file).read_bytes()) for r in sorted(plan.results, key=lambda r: r.result_index)]


def assert_same_images(answered: list[dict], written: list[tuple[int, bytes]]) -> None:
    assert [item["seed"] for item in answered] == [seed for seed, _ in written]
    for item, (_, data) in zip(answered, written):
        ours = decode(base64.b64decode(item["imageBase64Data"]))
        theirs = decode(data)
        assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape
        assert ours.tobytes() == theirs.tobytes()


def test_a_served_task_with_references_and_the_face_pass_equals_its_recipe_run(tmp_path, monkeypatch):
    """The fake engine: two results padded into one call, a reference image, the face pass after the engine."""
    monkeypatch.delenv("FLOWGEN_FACE_DETECTOR", raising=False)
    reference = solid_png(tmp_path / "packshot.png", 96, 64, (200, 90, 30))
    fields = {"positivePrompt": "a teapot on oak", "width": 128, "height": 128, "steps": 3, "seed": 9001,
              "numberResults": 2, "outputFormat": "PNG", "ultralytics": {"confidence": 0.4}}
    sent = {**fields, "inputs": {"referenceImages": [
        "data:image/png;base64," + base64.b64encode(reference.read_bytes()).decode()]}}
    served_engine, run_engine = FakeEngine(), FakeEngine()
    answered = served(served_engine, tmp_path / "data", sent)
    written = run(run_engine, tmp_path, {**fields, "inputs": {"referenceImages": [str(reference)]}})
    assert_same_images(answered, written)
    # one engine call of the same rows and size on either side; one face pass per image, same settings and seeds
    (served_call,), (run_call,) = served_engine.calls, run_engine.calls
    assert (served_call.prompts, served_call.seeds) == (run_call.prompts, run_call.seeds) == (
        ["a teapot on oak"] * 2, [9001, 9002])
    assert served_engine.face_calls == run_engine.face_calls and len(run_engine.face_calls) == 2


@pytest.mark.slow
def test_the_tiny_model_serves_the_pixels_its_recipe_run_writes(tmp_path):
    """The real tiny model (one pipeline, shared by both sides): the same task and seed, batch size 2."""
    engine = PipelineEngine("flux2-klein-tiny")
    fields = {"positivePrompt": "a lighthouse at dusk, oil painting", "width": 128, "height": 128, "steps": 2,
              "seed": 4242, "numberResults": 2, "outputFormat": "PNG"}
    answered = served(engine, tmp_path / "data", fields)
    written = run(engine, tmp_path, fields)
    assert_same_images(answered, written)
    assert not np.array_equal(decode(written[0][1]), decode(written[1][1]))  # two seeds, two images
