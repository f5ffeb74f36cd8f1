"""Pinned plan outputs: item keys, ids, seeds, content hashes, file names, resolved tasks and error texts.

The values below were recorded from the straightforward (slow) implementation before the plan
compiler was optimised; any change to them means a behaviour change that re-renders users' outputs
(or changes what they read), not a refactoring. Update them only for an intended change, and say so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from flowgen.errors import RecipeError
from flowgen.plan.compile import compile_plan
from flowgen.plan.hashing import canonical_json
from flowgen.recipe.api import expand_items, load_recipe

MODEL_IDENTITY = {"name": "pinned-model", "weights": "fixed"}  # fixed: cards may change, this may not
PRODUCTS = "sku,name,size,cfg\nP1,white sneaker,256,2.5\nP2,brown {boot},320,3\nP3,red loafer,256,4.25\n"
STYLES = '{"id": "warm", "steps": 3, "quality": 80}\n{"id": "cold", "steps": 5, "quality": 90}\n'


def ppm(side: int, shade: int) -> bytes:
    """A deterministic uncompressed image (its bytes never depend on an encoder version)."""
    return f"P6 {side} {side} 255\n".encode() + bytes([shade, 255 - shade, 7]) * (side * side)


def write(folder: Path, recipe: dict) -> Path:
    (folder / "data").mkdir(exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "data/products.csv").write_text(PRODUCTS)
    (folder / "data/styles.jsonl").write_text(STYLES)
    for index, sku in enumerate(["P1", "P2", "P3"]):
        (folder / f"refs/{sku}.ppm").write_bytes(ppm(64 + 16 * index, 40 * index))
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def recipe(**changes) -> dict:
    base = {
        "version": 1,
        "name": "pinned",
        "model": "klein-base-4b",
        "seed": 77,
        "defaults": {"numberResults": 2, "negativePrompt": "blurry, {style.id}", "outputQuality": "{style.quality}"},
        "datasets": {"products": {"csv": "data/products.csv", "key": "{sku}"},
                     "styles": {"jsonl": "data/styles.jsonl", "key": "{id}"}},
        "matrix": {"product": "products", "style": "styles", "angle": ["front", "side"]},
        "exclude": [{"product": {"sku": "P2"}, "angle": "side"}],
        "include": [{"style": "warm", "mood": "cosy"}],
        "task": {
            "positivePrompt": "a {product.name} from the {angle} {{studio}} #{product.size:>5}",
            "width": "{product.size}",
            "height": 256,
            "steps": "{style.steps}",
            "CFGScale": "{product.cfg}",
            "outputFormat": "PNG",
            "inputs": {"referenceImages": ["refs/{product.sku}.ppm"]},
        },
        "output": {"filename": "{product.sku}/{angle}-{style.id}_{result:02d}.{ext}"},
    }
    base.update(changes)
    return base


def plan_lines(tmp_path: Path, spec: dict, overrides=()) -> tuple[list[str], object]:
    loaded = load_recipe(write(tmp_path, spec), list(overrides))
    items = expand_items(loaded)
    plan = compile_plan(recipe_name=loaded.name, recipe_seed=loaded.seed, items=items, out_dir=tmp_path / "out",
                        filename=loaded.render_filename, model="pinned", model_identity=MODEL_IDENTITY,
                        distilled=bool(loaded.distilled),
                        recipe_hash=hashlib.sha256(canonical_json(loaded.raw).encode()).hexdigest())
    root = str(tmp_path)
    lines = []
    for result in plan.results:
        item = result.item
        task = json.dumps(item.task).replace(root, "<dir>")  # key order matters here, so no sort_keys
        rel = Path(result.output_file).relative_to(tmp_path / "out").as_posix()
        lines.append(f"{item.key}|{item.item_id}|{result.result_index}|{result.seed}|{result.content_hash}|{rel}|"
                     f"{item.guidance}|{item.signature}|{json.dumps(item.values)}|{task}")
    return lines, plan


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_pinned_plan_of_a_recipe_using_most_features(tmp_path):
    lines, plan = plan_lines(tmp_path, recipe())
    assert len(lines) == 20  # (3 products x 2 styles x 2 angles - 2 excluded) x 2 results
    first = plan.results[0]
    assert first.item.key == "angle=front|mood=cosy|product=P1|style=warm"
    assert first.item.item_id == "d0eb7777715e"
    assert first.seed == 5213793061601340057
    assert first.content_hash == "2182c08468f4e08e53b29da9bbdf964059e7a61a2deaea3ec697d78f8b879fcc"
    assert first.output_file.endswith("out/P1/front-warm_00.png")
    assert first.item.task["positivePrompt"] == "a white sneaker from the front {studio} #  256"
    assert first.item.task["width"] == 256 and first.item.task["CFGScale"] == 2.5
    assert digest(lines) == "e9529aac29cb1663dad76b971e67380e590d563ac0a18b5cbc72b7ff65f0a2ec", "\n".join(lines)
    assert plan.plan_hash == "d6a9ecf497b348a92ee1e29525ada6309cc7d22e87e79f0232461cfa3337bb9d"


def test_pinned_plan_with_explicit_seed_and_default_filename(tmp_path):
    spec = recipe(output={"filename": "{slug}_{result}.{ext}"})
    lines, plan = plan_lines(tmp_path, spec, ["task.seed=1000", "task.numberResults=3"])
    assert [r.seed for r in plan.results[:3]] == [1000, 1001, 1002]
    assert plan.results[0].output_file.endswith("out/angle-front_mood-cosy_product-P1_style-warm_0.png")
    assert digest(lines) == "cb86f9eae6c2f1399a1f0ec00dbe3fea1f0c1e01e18f477f6be4016c2d9d35ad", "\n".join(lines)


def test_pinned_plan_of_a_distilled_model_with_static_task(tmp_path):
    spec = recipe(model="runware:400@6", defaults={}, include=[], exclude=[],
                  task={"positivePrompt": "a {product.name}", "width": 512, "height": 512,
                        "inputs": {"referenceImages": ["refs/P1.ppm", "refs/{product.sku}.ppm"]}})
    lines, plan = plan_lines(tmp_path, spec)
    assert len(lines) == 12 and plan.results[0].item.guidance is None
    assert digest(lines) == "a02edc3a3d83d9f089636ef6b6956ebbdeb75aae895fa007661849a51da55b93", "\n".join(lines)


def test_pinned_problems_of_bad_templated_values(tmp_path):
    (tmp_path / "data").mkdir()
    spec = recipe()
    write(tmp_path, spec)
    (tmp_path / "data/products.csv").write_text(PRODUCTS + "P4,green clog,100,2\nP5,,250,30\nP6,blue mule,112,x\n")
    with pytest.raises(RecipeError) as err:
        expand_items(load_recipe(tmp_path / "recipe.yaml"))
    assert err.value.problems == [
        "task.width: must be a multiple of 16 between 128 and 2048, got '100' (item 'angle=front|mood=cosy|product=P4|style=warm') [and 11 more items with this problem]",
        "task.CFGScale: must be a number between 1 and 20 in steps of 0.01, got '30' (item 'angle=front|mood=cosy|product=P5|style=warm') [and 7 more items with this problem]",
    ]
