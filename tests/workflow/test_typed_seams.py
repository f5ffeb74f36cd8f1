"""Typed seams between the plan and the run (issue 19 item 5): a named Signature, typed Plan
fields instead of a free-form dict, a typed resolved task, and execute() taking one RunPlan."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen.cli import main
from flowgen.plan.compile import compile_plan
from flowgen.plan.from_recipe import plan_recipe
from flowgen.plan.job import FacePass, Job, Signature
from flowgen.plan.model import Canary, RecipeSource
from flowgen.plan.run_plan import RunPlan
from flowgen.plan.task import Delivery, ResolvedTask
from flowgen.recipe.api import Item
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.faces import face_settings, refine_settings
from flowgen.run.manifest import Manifest, load_watermarks


def test_a_signature_is_named_and_still_equal_hashed_and_printed_as_its_plain_tuple():
    job = Job.from_task({"positivePrompt": "p", "width": 128, "height": 64, "steps": 6, "scheduler": "DPM++ 2M",
                         "acceleration": "low", "acceleratorOptions": {"cacheEndStep": 4}}, guidance=3.5,
                        loras=[("/l/a.safetensors", "ab" * 32, 0.5)])
    signature = job.signature
    plain = (128, 64, 6, 3.5, "DPM++ 2M", "low", (("cacheEndStep", 4),), (("ab" * 32, 0.5),))
    assert isinstance(signature, Signature)
    assert (signature.width, signature.height, signature.steps, signature.guidance) == (128, 64, 6, 3.5)
    assert (signature.scheduler, signature.acceleration) == ("DPM++ 2M", "low")
    assert signature.accelerator_options == (("cacheEndStep", 4),) and signature.lora_set == (("ab" * 32, 0.5),)
    # what batches group by, serve keys its queues on and pinned plan outputs print: unchanged
    assert signature == plain and hash(signature) == hash(plain) and repr(signature) == repr(plain)
    assert str(signature) == str(plain) and f"{signature}" == f"{plain}"
    assert signature.label == "128x64, 6 steps, cfg 3.5, DPM++ 2M, acceleration low, cacheEndStep=4, LoRA ababababx0.5"


def test_a_default_signature_labels_as_before():
    job = Job.from_task({"positivePrompt": "p", "width": 256, "height": 256, "steps": 4}, guidance=None)
    assert job.signature.label == "256x256, 4 steps, no cfg"
    assert job.signature.guidance is None and job.signature.lora_set == ()


def write_recipe(folder: Path, extra: str = "", incremental: bool = True) -> Path:
    (folder / "products.csv").write_text("sku,name\nA-1,red shoe\nB-2,blue boot\n")
    path = folder / "recipe.yaml"
    path.write_text(f"""version: 1
name: seams
model: flux2-klein-tiny
{extra}
datasets:
  products: {{csv: products.csv, key: "{{sku}}", incremental: {str(incremental).lower()}}}
matrix:
  product: products
task:
  positivePrompt: "photo of {{product.name}}"
  width: 128
  height: 128
  steps: 2
  outputFormat: PNG
output:
  filename: "{{product.sku}}_{{result}}.{{ext}}"
""")
    return path


def test_a_plan_holds_what_the_recipe_adds_as_typed_fields_and_is_frozen(tmp_path):
    recipe = write_recipe(tmp_path, "canary: {items: 1, threshold_db: 35}")
    plan = plan_recipe(recipe, tmp_path / "out", watermarks=load_watermarks)
    assert plan.source == RecipeSource(str(recipe.resolve())) and plan.canary == Canary(items=1, threshold_db=35.0)
    assert plan.card.name == "flux2-klein-tiny" and plan.engine_model is plan.card
    assert [d.dataset for d in plan.incremental.datasets] == ["products"] and plan.incremental.datasets[0].new_rows == 2
    assert plan.retained_item_ids == frozenset() and plan.incremental.next_watermarks["products"]["entries"] == ["A-1", "B-2"]
    assert not hasattr(plan, "extra")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.plan_hash = "changed"  # type: ignore[misc]
    (tmp_path / "plain").mkdir()
    bare = plan_recipe(write_recipe(tmp_path / "plain", incremental=False), None)
    assert bare.canary is None and bare.incremental is None and bare.retained_item_ids == frozenset()


class LoadedFakeEngine(FakeEngine):
    """FakeEngine in PipelineEngine's place (same constructor)."""

    load_seconds = 0.0

    def __init__(self, model=None, dtype="float32"):
        super().__init__(dtype=dtype)


def test_run_records_the_recipe_its_set_options_and_out_with_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr("flowgen.commands.run.PipelineEngine", LoadedFakeEngine)
    recipe = write_recipe(tmp_path)
    out = tmp_path / "elsewhere"
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out), "--set", "task.steps=3"])
    assert result.exit_code == 0, result.output
    with Manifest(out, create=False) as manifest:
        assert manifest.last_recipe() == {"path": str(recipe.resolve()), "overrides": ["task.steps=3"], "out_option": True}


FULL_TASK = {"positivePrompt": "a portrait", "negativePrompt": "blurry", "width": 128, "height": 128, "steps": 2,
             "numberResults": 3, "seed": 40, "outputFormat": "png", "outputQuality": 80, "taskUUID": "uuid-1",
             "outputType": "base64Data", "uploadEndpoint": "https://bucket.example/x.png?sig=1",
             "webhookURL": "https://hooks.example/h", "deliveryMethod": "async", "includeCost": True,
             "safety": {"checkContent": True}, "ttl": 3600,
             "ultralytics": {"steps": 12, "strength": 0.4, "negativePrompt": "ugly"}}


def test_a_resolved_task_is_read_once_into_typed_values():
    resolved = ResolvedTask.from_task(FULL_TASK, guidance=None, references=["/r/a.png"], reference_hashes=["aa"])
    assert resolved.number_results == 3 and resolved.seed == 40
    assert resolved.job == Job.from_task(FULL_TASK, guidance=None, references=["/r/a.png"], reference_hashes=["aa"])
    assert (resolved.job.prompt, resolved.job.output_format, resolved.job.output_quality) == ("a portrait", "PNG", 80)
    assert resolved.job.face_pass == FacePass("a portrait", "ugly", steps=12, strength=0.4)
    assert resolved.delivery == Delivery(task_uuid="uuid-1", output_type="base64Data",
                                         upload_endpoint="https://bucket.example/x.png?sig=1",
                                         webhook_url="https://hooks.example/h", method="async", include_cost=True,
                                         check_content=True, ttl=3600)
    bare = ResolvedTask.from_task({"positivePrompt": "p", "width": 128, "height": 128, "steps": 2}, guidance=None)
    assert (bare.number_results, bare.seed, bare.job.face_pass, bare.delivery) == (1, None, None, Delivery())
    # the engine's face settings: the job's face pass, as the raw task's reading gives them
    assert refine_settings(resolved.job.face_pass) == face_settings(FULL_TASK)
    assert refine_settings(None) is None


def test_the_run_renders_finishes_and_delivers_from_the_typed_values_not_the_task_dict(tmp_path, monkeypatch):
    """After planning the executor reads nothing of an item by field name: with every task dict
    emptied, the face pass, the cost, the taskUUID and the outputType still come from the plan."""
    monkeypatch.delenv("FLOWGEN_FACE_DETECTOR", raising=False)
    task = {k: v for k, v in FULL_TASK.items() if k not in ("uploadEndpoint", "webhookURL", "safety", "deliveryMethod")}
    items = [Item(key="only", values={}, task=task)]
    plan = compile_plan(recipe_name="r", recipe_seed=1, items=items, out_dir=tmp_path / "out", model="tiny",
                        model_identity={"m": 1}, filename=lambda it, i, ext: f"{it.key}_{i}.{ext}", distilled=False,
                        recipe_hash="h")
    assert [r.seed for r in plan.results] == [40, 41, 42] and plan.items[0].number_results == 3
    for item in plan.items:
        item.task.clear()
    engine = FakeEngine()
    summary = execute(against_folder(plan), engine)
    assert (summary.rendered, summary.failed) == (3, 0)
    assert engine.calls[0].prompts[:3] == ["a portrait"] * 3 and engine.calls[0].steps == 2
    assert [(settings.steps, settings.strength, settings.negative_prompt) for settings, _ in engine.face_calls] == [
        (12, 0.4, "ugly")] * 3
    with Manifest(tmp_path / "out", create=False) as manifest:
        records = list(manifest.records())
    assert {(r["taskUUID"], r["outputType"], r["output"]["format"]) for r in records} == {("uuid-1", "base64Data", "PNG")}
    assert all(r.get("cost") is not None and r["faces"] for r in records)  # includeCost, the face pass


def test_execute_runs_the_run_plan_its_caller_builds_against_the_folder(tmp_path):
    out = tmp_path / "out"
    items = [Item(key=f"k{i}", values={}, task={"positivePrompt": f"p{i}", "width": 128, "height": 128, "steps": 2,
                                                 "outputFormat": "PNG"}) for i in range(3)]
    plan = compile_plan(recipe_name="r", recipe_seed=1, items=items, out_dir=out, model="tiny", model_identity={"m": 1},
                        filename=lambda it, i, ext: f"{it.key}_{i}.{ext}", distilled=False, recipe_hash="h")
    fresh = against_folder(plan)
    assert isinstance(fresh, RunPlan) and len(fresh.runnable) == 3 and not out.exists()  # reads, writes nothing
    assert execute(fresh, FakeEngine()).rendered == 3
    (out / "k1_0.png").write_bytes(b"edited by hand")
    assert [r.item.key for r in against_folder(plan).to_run] == ["k1"]  # outputs re-hashed
    assert against_folder(plan, verify_files=False).to_run == ()  # the manifest trusted (run --detach's check)
    engine = FakeEngine()
    summary = execute(against_folder(plan), engine)
    assert (summary.rendered, summary.unchanged, [c.prompts[:1] for c in engine.calls]) == (1, 2, [["p1"]])
