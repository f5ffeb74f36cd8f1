"""LoRAs in the workflow: names resolve to files, LoRA sets split batches, file content is identity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from flowgen.engine.errors import EngineInputError
from flowgen.engine.lora.source import lora_path
from flowgen.errors import RecipeError
from flowgen.plan import compile_plan, make_batches
from flowgen.recipe.api import Item, validate_task
from flowgen.run.engine import FakeEngine
from flowgen.run.executor import against_folder, execute
from flowgen.run.manifest import Manifest
from flowgen.run.regen import regenerate, resolve_targets


def write_lora(path, seed=0, module="diffusion_model.img_in"):
    """A small valid LoRA file (the planner reads its header and hashes its bytes)."""
    rng = np.random.default_rng(seed)
    save_file({f"{module}.lora_A.weight": rng.standard_normal((2, 128)).astype(np.float32),
               f"{module}.lora_B.weight": rng.standard_normal((64, 2)).astype(np.float32)}, str(path))
    return path


def item(key, loras=None, **task):
    base = {"positivePrompt": f"prompt {key}", "width": 64, "height": 64, "steps": 2, "numberResults": 1,
            "outputFormat": "PNG"}
    if loras is not None:
        base["lora"] = loras
    base.update(task)
    return Item(key=key, values={}, task=base, references=())


def plan_of(items, out):
    return compile_plan(recipe_name="r", recipe_seed=3, items=items, out_dir=out,
                        filename=lambda it, i, ext: f"{it.key}_{i}.{ext}", model="tiny",
                        model_identity={"m": 1}, distilled=False, recipe_hash="h", max_batch=8)


@pytest.fixture
def lora_dir(tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    folder.mkdir()
    for seed, name in enumerate(("brand", "ink", "civitai_123_456")):
        write_lora(folder / f"{name}.safetensors", seed)
    monkeypatch.setenv("FLOWGEN_LORA_DIR", str(folder))
    return folder


def test_names_resolve_in_the_lora_folder(lora_dir, tmp_path):
    assert lora_path("brand") == lora_dir / "brand.safetensors"
    assert lora_path("ink.safetensors") == lora_dir / "ink.safetensors"
    assert lora_path("civitai:123@456") == lora_dir / "civitai_123_456.safetensors"
    assert lora_path(str(lora_dir / "brand.safetensors")) == lora_dir / "brand.safetensors"
    with pytest.raises(EngineInputError, match=r"^task.lora\[0\].model: LoRA file not found: .*missing.safetensors"):
        lora_path("missing", "task.lora[0].model")
    with pytest.raises(EngineInputError, match="may not contain '..'"):
        lora_path("../brand")


def test_different_lora_sets_run_in_different_batches(lora_dir, tmp_path):
    brand, ink = [{"model": "brand", "weight": 0.8}], [{"model": "ink"}]
    items = ([item(f"a{i}", brand) for i in range(3)] + [item(f"b{i}", ink) for i in range(2)]
             + [item(f"c{i}") for i in range(2)] + [item("d", [{"model": "brand", "weight": -0.5}])])
    plan = plan_of(items, tmp_path / "out")
    batches = make_batches(plan.results, plan.max_batch)
    groups = sorted(sorted(r.item.key for r in b.results) for b in batches)
    assert groups == [["a0", "a1", "a2"], ["b0", "b1"], ["c0", "c1"], ["d"]]
    engine = FakeEngine()
    execute(against_folder(plan), engine)
    sent = sorted((c.loras or []) and [(Path(p).name, w) for p, w in c.loras] for c in engine.calls)
    assert sent == [[], [("brand.safetensors", -0.5)], [("brand.safetensors", 0.8)], [("ink.safetensors", 1.0)]]


def test_a_changed_lora_file_re_renders_only_its_items(lora_dir, tmp_path):
    out = tmp_path / "out"
    items = [item("a", [{"model": "brand"}]), item("b", [{"model": "ink"}]), item("c")]
    first = execute(against_folder(plan_of(items, out)), FakeEngine())
    assert first.rendered == 3
    unchanged = execute(against_folder(plan_of(items, out)), FakeEngine())
    assert (unchanged.rendered, unchanged.unchanged) == (0, 3)
    retrained = write_lora(lora_dir / "ink.safetensors", seed=7).read_bytes()
    engine = FakeEngine()
    again = execute(against_folder(plan_of(items, out)), engine)
    assert (again.rendered, again.unchanged) == (1, 2)
    assert [c.prompts[0] for c in engine.calls] == ["prompt b"]
    with Manifest(out) as manifest:
        record = next(r for r in manifest.records() if r["item_key"] == "b")
    assert record["batch"]["loras"] == [{"path": str(lora_dir / "ink.safetensors"),
                                         "sha256": hashlib.sha256(retrained).hexdigest(), "weight": 1.0}]


def test_moving_a_lora_file_changes_nothing(lora_dir, tmp_path):
    out = tmp_path / "out"
    execute(against_folder(plan_of([item("a", [{"model": "brand"}])], out)), FakeEngine())
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes((lora_dir / "brand.safetensors").read_bytes())
    again = execute(against_folder(plan_of([item("a", [{"model": str(moved), "weight": 1}])], out)), FakeEngine())
    assert (again.rendered, again.unchanged) == (0, 1)


def test_missing_file_and_other_stage_are_one_line_errors(lora_dir, tmp_path):
    with pytest.raises(RecipeError, match=r"task.lora\[1\].model \(item 'a'\): LoRA file not found: .*nope"):
        plan_of([item("a", [{"model": "brand"}, {"model": "nope"}])], tmp_path / "out")
    problems = validate_task({"positivePrompt": "p", "width": 256, "height": 256,
                              "lora": [{"model": "nope"}, {"model": "brand", "transformer": "high"}]})
    assert len(problems) == 2
    assert problems[0].startswith("task.lora[0].model: LoRA file not found:")
    assert problems[1].startswith("task.lora[1].transformer: FLUX.2 [klein] has one transformer stage")
    assert validate_task({"positivePrompt": "p", "width": 256, "height": 256,
                          "lora": [{"model": "brand", "weight": -4}, {"model": "{row.lora}"}]}) == []


def test_regen_replays_a_lora_item_identically(lora_dir, tmp_path):
    out = tmp_path / "out"
    plan = plan_of([item("a", [{"model": "brand", "weight": 0.8}]), item("b")], out)
    execute(against_folder(plan), FakeEngine())
    with Manifest(out) as manifest:
        records = resolve_targets(manifest, [plan.results[0].item.item_id])
    engines = []
    outcomes = regenerate(records, tmp_path / "regen",
                          engine_for=lambda model, dtype: engines.append(FakeEngine(dtype=dtype)) or engines[-1])
    assert all(o.matches for o in outcomes), outcomes
    assert [(Path(p).name, w) for p, w in engines[0].calls[0].loras] == [("brand.safetensors", 0.8)]


def test_a_file_that_is_no_lora_flowgen_reads_fails_validate_and_plan(lora_dir, tmp_path):
    write_lora(lora_dir / "sdxl.safetensors", module="lora_unet_down_blocks_0_attentions_0_proj_in")
    (lora_dir / "junk.safetensors").write_bytes(b"not a safetensors file")
    problems = validate_task({"positivePrompt": "p", "width": 256, "height": 256,
                              "lora": [{"model": "sdxl"}, {"model": "junk"}]})
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert problems[0].startswith("task.lora[0].model: LoRA ") and "2 tensor(s) flowgen does not know" in problems[0]
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_A.weight" in problems[0]
    assert problems[1].startswith("task.lora[1].model: ") and "junk.safetensors" in problems[1]
    with pytest.raises(RecipeError, match=r"task.lora\[0\].model \(item 'a'\): LoRA .*sdxl.safetensors: 2 tensor"):
        plan_of([item("a", [{"model": "sdxl"}])], tmp_path / "out")


def test_regen_refuses_when_a_lora_changed_since_the_run(lora_dir, tmp_path):
    out = tmp_path / "out"
    plan = plan_of([item("a", [{"model": "ink"}])], out)
    execute(against_folder(plan), FakeEngine())
    write_lora(lora_dir / "ink.safetensors", seed=9)
    with Manifest(out) as manifest:
        records = resolve_targets(manifest, [plan.results[0].item.item_id])
    (outcome,) = regenerate(records, tmp_path / "regen", engine_for=lambda model, dtype: FakeEngine(dtype=dtype))
    assert outcome.error == f"LoRA {lora_dir / 'ink.safetensors'} changed since the run"


def test_the_engine_adapter_refuses_a_lora_changed_since_the_plan():
    from flowgen.errors import CheckpointError
    from flowgen.run.engine import BatchRequest, _check_lora_hashes

    request = BatchRequest(prompts=["p"], seeds=[1], width=64, height=64, steps=2,
                           loras=[("/l/off.safetensors", 0.0), ("/l/a.safetensors", 0.5)], lora_hashes=("h0", "ha"))
    _check_lora_hashes(request, (("ha", 0.5),))  # what the pipeline merged: weight-0 LoRAs are dropped
    with pytest.raises(CheckpointError, match=r"^LoRA /l/a.safetensors changed since the plan; plan again$"):
        _check_lora_hashes(request, (("retrained", 0.5),))
