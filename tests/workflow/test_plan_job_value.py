"""The job (engine parameters read once per item) and the plan's run value (diff + batches, built once)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowgen.plan import Job, RunPlan, compile_plan
from flowgen.plan.from_recipe import plan_recipe
from flowgen.recipe.api import Item
from flowgen.run.engine import BatchRequest, FakeEngine
from flowgen.run.executor import execute
from flowgen.run.manifest import Manifest
from flowgen.run.references import ReferenceLoader

QUICKSTART = str(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml")


def item(key, refs=(), **task):
    base = {"positivePrompt": f"prompt {key}", "negativePrompt": "blurry", "width": 64, "height": 64, "steps": 2,
            "numberResults": 1, "outputFormat": "png", "outputQuality": 90, "CFGScale": 3}
    base.update(task)
    return Item(key=key, values={}, task=base, references=tuple(Path(r) for r in refs))


def plan_of(items, out, max_batch=4):
    return compile_plan(recipe_name="r", recipe_seed=3, items=items, out_dir=out,
                        filename=lambda it, i, ext: f"{it.key}_{i}.{ext}", model="tiny",
                        model_identity={"m": 1}, distilled=False, recipe_hash="h", max_batch=max_batch)


def test_each_item_carries_a_frozen_job_read_from_its_task(tmp_path):
    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(ref)
    plan = plan_of([item("a", refs=(ref,), scheduler="DPM++ 2M"), item("b", CFGScale=1)], tmp_path / "out")
    a, b = (i.job for i in plan.items)
    assert a == Job("prompt a", "blurry", 64, 64, 2, 3.0, "DPM++ 2M", (str(ref),), a.reference_hashes, "PNG", 90)
    assert a.reference_hashes == plan.items[0].reference_hashes and len(a.reference_hashes[0]) == 64
    assert a.signature == plan.items[0].signature == (64, 64, 2, 3.0, "DPM++ 2M", "high", (), ()) and a.engine_scheduler == "DPM++ 2M"
    assert b.guidance is None and b.engine_scheduler is None and plan.results[1].job is b
    with pytest.raises(AttributeError):
        a.width = 128  # type: ignore[misc]


def test_requests_are_built_from_jobs_padded_to_the_batch_size():
    job = Job("p", "n", 64, 32, 2, 3.5, "Default")
    request = BatchRequest.for_jobs([(job, 7, []), (job._replace(prompt="q"), 8, [])], 4)
    assert request.prompts == ["p", "q", "q", "q"] and request.seeds == [7, 8, 8, 8]
    assert request.negative_prompts == ["n"] * 4 and request.references is None and request.scheduler is None
    assert (request.width, request.height, request.steps, request.guidance) == (64, 32, 2, 3.5)
    assert BatchRequest.for_jobs([(job._replace(guidance=None), 1, [])]).negative_prompts is None
    with pytest.raises(ValueError, match="signature"):
        BatchRequest.for_jobs([(job, 1, []), (job._replace(steps=4), 2, [])])


def test_the_run_value_holds_the_diff_and_batches_once(tmp_path):
    plan = plan_of([item(f"k{i}") for i in range(6)] + [item("bad", refs=(tmp_path / "gone.png",))], tmp_path)
    value = plan.against({})
    assert isinstance(value, RunPlan) and len(value.to_run) == 7
    assert [r.item.key for r in value.blocked] == ["bad"] and len(value.runnable) == 6
    assert value.batches() is value.batches() and [b.size for b in value.batches()] == [4, 2]
    limited = value.limited(3)
    assert (len(limited.runnable), limited.held_back, [b.size for b in limited.batches()]) == (3, 3, [4])
    assert limited.limited(None).runnable == value.runnable
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.diff = None  # type: ignore[misc]


def test_execute_takes_a_current_run_value_and_rebuilds_a_stale_one(tmp_path):
    out = tmp_path / "out"
    plan = plan_of([item(f"k{i}") for i in range(3)], out)
    before = plan.against({})
    assert execute(before, FakeEngine()).rendered == 3
    with Manifest(out) as manifest:
        current = plan.against(manifest.index(), manifest.get)
    assert not before.is_current(current.index) and current.to_run == ()
    engine = FakeEngine()
    assert execute(before, engine).rendered == 0 and engine.calls == []  # stale: diffed again under the lock
    assert execute(current, engine).unchanged == 3 and engine.calls == []


def test_plan_recipe_does_not_read_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGEN_MAX_BATCH", "abc")  # the commands read it (flowgen.run.settings), not the planner
    assert plan_recipe(QUICKSTART, tmp_path).max_batch == 8
    assert plan_recipe(QUICKSTART, tmp_path, max_batch=2).max_batch == 2


def test_the_reference_loader_uses_the_engine_decoder_and_its_limits(tmp_path, monkeypatch):
    from flowgen.engine.references import images

    path = tmp_path / "p.png"
    Image.fromarray(np.full((64, 80), 200, np.uint8), mode="L").save(path)
    loader = ReferenceLoader()
    image = loader.load(str(path))
    assert image.mode == "RGB" and image.size == (80, 64) and loader.load(str(path)) is image  # cached
    monkeypatch.setattr(images, "MAX_DECODE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"p.png: is 80x64 \(5,120 pixels\); the limit is 1,000 pixels"):
        ReferenceLoader().load(str(path))
