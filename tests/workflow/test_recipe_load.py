"""Loading and validation details: overrides, task rules, engine support, model cards, references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.numpy import save_file

from flowgen.commands.validate import validate_command
from flowgen.engine.catalog import cards as model_cards
from flowgen.engine.catalog.cards import ModelCard
from flowgen.errors import CheckpointError, RecipeError
from flowgen.recipe.api import Item, check_references, expand_items, load_recipe, validate_task
from flowgen.recipe.loading import apply_override, parse_override
from flowgen.recipe.spec import DISTILLED_AIRS

RECIPES = Path(__file__).parents[2] / "recipes"


def write(folder: Path, recipe: dict | str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def simple(**task) -> dict:
    return {"version": 1, "name": "t", "model": "runware:400@6", "task": {"positivePrompt": "a cat", "width": 256, "height": 256, **task}}


def problems_of(tmp_path: Path, recipe: dict | str, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as err:
        expand_items(load_recipe(write(tmp_path, recipe), list(overrides)))
    return err.value.problems


# --- overrides ---------------------------------------------------------------------------------


def test_override_values_are_yaml_scalars_and_paths_are_created():
    data = {"task": {"inputs": {"referenceImages": ["a.jpg", "b.jpg"]}}}
    for text in ["task.steps=8", "task.includeCost=true", "task.CFGScale=1.5", "task.outputFormat=PNG", "task.inputs.referenceImages.1=c.jpg", "defaults.width=512"]:
        apply_override(data, *parse_override(text), text)
    assert data["task"]["steps"] == 8 and data["task"]["includeCost"] is True and data["task"]["CFGScale"] == 1.5
    assert data["task"]["inputs"]["referenceImages"] == ["a.jpg", "c.jpg"] and data["defaults"] == {"width": 512}
    assert parse_override("task.inputs.referenceImages=[x.jpg, y.jpg]")[1] == ["x.jpg", "y.jpg"]


def test_override_reaches_validation_and_is_reported_with_its_field(tmp_path):
    assert problems_of(tmp_path, simple(), ["task.width=1000", "nonsense"]) == [
        "--set 'nonsense': expected KEY=VALUE with a dotted key, e.g. task.steps=8",
        "task.width: must be a multiple of 16 between 128 and 2048, got 1000",
    ]


def test_override_cannot_smuggle_a_python_tag(tmp_path):
    problems = problems_of(tmp_path, simple(), ["task.positivePrompt=!!python/object/apply:os.system [id]"])
    assert len(problems) == 1 and "not allowed" in problems[0] and problems[0].startswith("--set ")


# --- task rules ----------------------------------------------------------------------------------


def test_validate_task_skips_templates_and_reports_everything_else():
    assert validate_task({"positivePrompt": "{p.name}", "width": "{p.w}", "steps": 4}, "task") == []
    assert validate_task({"width": 100, "height": 2050, "numberResults": 0, "CFGScale": "x"}, "defaults") == [
        "defaults.width: must be a multiple of 16 between 128 and 2048, got 100",
        "defaults.height: must be a multiple of 16 between 128 and 2048, got 2050",
        "defaults.numberResults: must be an integer between 1 and 20, got 0",
        "defaults.CFGScale: must be a number between 1 and 20 in steps of 0.01, got 'x'",
    ]


def test_boundaries_of_the_spec_ranges():
    ok = {"width": 128, "height": 2048, "steps": 50, "numberResults": 20, "outputQuality": 99, "seed": 2**63 - 1, "CFGScale": 20, "ttl": 60}
    assert validate_task(ok) == []
    assert validate_task({"steps": 1, "outputQuality": 20, "seed": 0, "CFGScale": 1}) == []
    assert validate_task({"seed": 2**63})[0].startswith("task.seed: must be an integer between 0 and")
    assert validate_task({"CFGScale": 3.555})[0].startswith("task.CFGScale: must be a number between 1 and 20 in steps of 0.01")
    assert validate_task({"steps": True}) == ["task.steps: must be an integer between 1 and 50, got True"]
    assert validate_task({"steps": 4.5}) == ["task.steps: must be an integer between 1 and 50, got 4.5"]


def test_accepted_and_recorded_fields_pass_through(tmp_path):
    recipe = simple(includeCost=True, outputType="base64Data", deliveryMethod="sync", scheduler="Default",
                    acceleration="high", safety={"checkContent": False}, taskType="imageInference",
                    taskUUID="8f1b2f4e-3c5a-4d2e-9b7a-1c2d3e4f5a6b", negativePrompt="blurry")
    task = expand_items(load_recipe(write(tmp_path, recipe)))[0].task
    for field in ("includeCost", "outputType", "deliveryMethod", "scheduler", "acceleration", "safety", "taskUUID", "negativePrompt"):
        assert task[field] == recipe["task"][field]


def test_the_engine_fields_of_the_spec_are_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGEN_LORA_DIR", str(tmp_path))
    save_file({"transformer.x_embedder.lora_A.weight": np.zeros((1, 128), np.float32),
               "transformer.x_embedder.lora_B.weight": np.zeros((64, 1), np.float32)},
              str(tmp_path / "civitai_1_1.safetensors"))
    recipe = simple(lora=[{"model": "civitai:1@1"}], ultralytics={"steps": 10}, acceleratorOptions={"teaCache": True})
    # step caches, LoRAs and the face pass all run (refusals: test_engine_capabilities)
    task = expand_items(load_recipe(write(tmp_path, recipe)))[0].task
    assert task["ultralytics"] == {"steps": 10} and task["acceleratorOptions"] == {"teaCache": True}


def test_delivery_fields_are_accepted(tmp_path):
    recipe = simple(uploadEndpoint="https://bucket.example.com/x?sig=1", webhookURL="https://hooks.example.com/in",
                    deliveryMethod="async", safety={"checkContent": True}, includeCost=True, ttl=600)
    task = expand_items(load_recipe(write(tmp_path, recipe)))[0].task
    for field in ("uploadEndpoint", "webhookURL", "deliveryMethod", "safety", "includeCost", "ttl"):
        assert task[field] == recipe["task"][field]


def test_cache_step_rules_need_the_whole_task(tmp_path):
    problems = problems_of(tmp_path, simple(steps=4, acceleratorOptions={"cacheStartStep": 3, "cacheEndStep": 6}))
    assert "task.acceleratorOptions.cacheEndStep: must be <= steps (4), got 6" in problems


def test_task_uuid_must_be_unique_per_item(tmp_path):
    recipe = simple(taskUUID="8f1b2f4e-3c5a-4d2e-9b7a-1c2d3e4f5a6b", positivePrompt="a {animal}")
    recipe["matrix"] = {"animal": ["cat", "dog"]}
    recipe["output"] = {"filename": "{animal}_{result}.{ext}"}
    assert problems_of(tmp_path, recipe)[0].startswith("task.taskUUID: must be unique per task")


def test_model_may_come_from_task_but_not_twice_differently(tmp_path):
    recipe = simple(model="runware:400@6")
    del recipe["model"]
    assert load_recipe(write(tmp_path, recipe)).model == "runware:400@6"
    recipe["model"] = "runware:400@3"
    assert problems_of(tmp_path, recipe)[0].startswith("model: set to different values")


def test_yaml_dates_stay_strings_and_duplicate_keys_are_errors(tmp_path):
    recipe = load_recipe(write(tmp_path, "version: 1\nname: t\nmodel: runware:400@6\ndescription: 2024-05-01\ntask: {positivePrompt: x, width: 256, height: 256}\n"))
    assert recipe.description == "2024-05-01"
    assert problems_of(tmp_path, "version: 1\nversion: 1\n") == [f"{tmp_path / 'recipe.yaml'}:2:1: YAML syntax error: duplicate key 'version' (first defined at line 1)"]


def test_a_missing_recipe_file_is_one_clean_problem(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "nope.yaml")
    assert err.value.problems == [f"{tmp_path / 'nope.yaml'}: recipe file not found"]


def test_structural_and_task_problems_are_reported_together(tmp_path):
    recipe = simple(width=100)
    recipe["colour"] = "red"
    assert problems_of(tmp_path, recipe) == [
        "colour: unknown field; allowed: version, name, description, model, seed, defaults, datasets, matrix, zip, include, exclude, task, output, schedule, canary",
        "task.width: must be a multiple of 16 between 128 and 2048, got 100",
    ]


# --- model cards ---------------------------------------------------------------------------------


def make_card(name: str, distilled: bool, defaults: dict) -> ModelCard:
    """A typed card as the card layer validates it (not a built-in one)."""
    return ModelCard.model_validate({
        "name": name, "architecture": "klein-4b", "kv": False, "distilled": distilled,
        "defaults": {"width": 1024, "height": 1024, **defaults}, "limits": {"cfg": not distilled},
        "weights": {"hf_repo": f"example/{name}"}})


@pytest.fixture
def fake_cards(monkeypatch):
    """Cards other than the built-in ones, so these tests pin the recipe layer's side of the contract."""
    cards = {"my-distilled": make_card("my-distilled", True, {"steps": 6, "CFGScale": 1.0}),
             "my-base": make_card("my-base", False, {"steps": 30, "CFGScale": 5.0, "width": 768, "height": 768})}

    def resolve_model(name):
        if name not in cards:
            raise CheckpointError(f"unknown model {name!r}; known models: {', '.join(cards)}")
        return cards[name]

    monkeypatch.setattr(model_cards, "resolve_model", resolve_model)
    return cards


def test_card_defaults_sit_under_the_recipe(tmp_path, fake_cards):
    recipe = {"version": 1, "name": "t", "model": "my-base", "task": {"positivePrompt": "x", "steps": 12}}
    loaded = load_recipe(write(tmp_path, recipe))
    task = expand_items(loaded)[0].task
    assert (task["steps"], task["CFGScale"], task["width"], task["height"]) == (12, 5.0, 768, 768)
    assert loaded.card.name == "my-base" and loaded.distilled is False


def test_card_marks_a_model_distilled(tmp_path, fake_cards):
    recipe = {"version": 1, "name": "t", "model": "my-distilled", "task": {"positivePrompt": "x", "width": 256, "height": 256}}
    assert expand_items(load_recipe(write(tmp_path, recipe)))[0].task["steps"] == 6
    recipe["task"]["CFGScale"] = 2
    assert problems_of(tmp_path, recipe) == ["task.CFGScale: my-distilled is guidance-distilled, so CFGScale must be absent or <= 1, got 2"]


def test_unknown_model_is_reported_as_a_model_problem(tmp_path, fake_cards):
    recipe = {"version": 1, "name": "t", "model": "nope", "task": {"positivePrompt": "x", "width": 256, "height": 256}}
    assert problems_of(tmp_path, recipe) == ["model: unknown model 'nope'; known models: my-distilled, my-base"]


def test_the_air_table_agrees_with_the_cards(tmp_path):
    """spec.DISTILLED_AIRS (used only when no card resolves a model) says what the cards say."""
    assert {air: model_cards.resolve_model(air).distilled for air in DISTILLED_AIRS} == DISTILLED_AIRS
    problems = problems_of(tmp_path, simple(CFGScale=3))
    assert problems == ["task.CFGScale: runware:400@6 (klein-9b-kv) is guidance-distilled, so CFGScale must be absent or <= 1, got 3"]


# --- references ----------------------------------------------------------------------------------


def test_check_references_reads_headers_and_names_file_and_item(tmp_path):
    good, small = tmp_path / "good.png", tmp_path / "small.png"
    Image.new("RGB", (64, 512), "white").save(good)
    Image.new("RGB", (64, 63), "white").save(small)
    items = [
        Item("a=1", {}, {}, (good,)),
        Item("a=2", {}, {}, (small, tmp_path / "gone.jpg")),
        Item("a=3", {}, {}, (good,) * 5),
    ]
    problems = check_references(items)
    assert any("small.png is 64x63; each side must be at least 64 px (item 'a=2')" in p for p in problems)
    assert any("gone.jpg does not exist (item 'a=2')" in p for p in problems)
    assert "task.inputs.referenceImages: item 'a=3' has 5 reference images; at most 4" in problems
    assert not any("good.png" in p for p in problems)


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (no real pixel data: only the header is read)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_reference_pixel_limit_is_the_engines(tmp_path):
    """At most 150 MP, as the engine decodes (flowgen/engine/references/images.py), whatever PIL's own 89 MP warning says."""
    phone = header_only_png(tmp_path / "phone.png", 8064, 6048)  # a 48 MP phone photo
    large = header_only_png(tmp_path / "large.png", 12000, 12000)  # 144 MP: over PIL's warning, under the limit
    over = header_only_png(tmp_path / "over.png", 13000, 13000)  # 169 MP: over the limit, under PIL's error
    bomb = header_only_png(tmp_path / "bomb.png", 20000, 20000)  # 400 MP: PIL refuses it outright
    problems = check_references([Item(f"a={i}", {}, {}, (path,)) for i, path in enumerate([phone, large, over, bomb])])
    assert not any("phone.png" in p or "large.png" in p for p in problems), problems
    assert any("over.png is 13000x13000 (169,000,000 pixels); the limit is 150,000,000 pixels" in p for p in problems), problems
    assert any("bomb.png is too large (400,000,000 pixels); the limit is 150,000,000 pixels" in p for p in problems), problems


# --- the command and the shipped recipes -----------------------------------------------------------


@pytest.mark.parametrize("name, summary", [("product-photos.yaml", "16 items, 32 results, 5 reference images"), ("quickstart.yaml", "4 items, 4 results")])
def test_shipped_recipes_validate(name, summary, capsys):
    validate_command(str(RECIPES / name), [])
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {RECIPES / name}: {summary}")


def test_validate_command_raises_every_problem_at_once(tmp_path):
    with pytest.raises(RecipeError) as err:
        validate_command(str(write(tmp_path, simple(width=100, steps=0))), ["task.outputQuality=10"])
    assert [p.split(":")[0] for p in err.value.problems] == ["task.width", "task.steps", "task.outputQuality"]
