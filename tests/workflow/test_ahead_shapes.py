"""What a run announces to the engine before it loads (run/engine.py `_loop_shape`): each plan
batch's shape with every row's reference set as planned — identity by content, stored sizes — so the
engine can compile the batch's encodes, pre-passes and loop ahead (tests/engine/sampling/test_ahead.py)."""

from __future__ import annotations

import json

import numpy as np
import yaml
from PIL import Image

from flowgen.engine import ReferenceSet
from flowgen.plan.batching import make_batches
from flowgen.plan.from_recipe import plan_recipe
from flowgen.run.engine import _loop_shape


def test_a_batch_announces_each_rows_reference_set_and_pads_like_the_engine_call(tmp_path):
    sizes = {"a.png": (96, 80), "b.png": (64, 64), "c.png": (112, 128), "a-copy.png": (96, 80)}
    rng = np.random.default_rng(0)
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "a-copy.png").write_bytes((tmp_path / "a.png").read_bytes())  # same content, another file
    products = [{"sku": "A", "shots": ["a.png"]}, {"sku": "B", "shots": ["b.png", "c.png"]},
                {"sku": "C", "shots": ["a-copy.png"]}]
    (tmp_path / "products.jsonl").write_text("".join(json.dumps(p) + "\n" for p in products))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "name": "shapes", "model": "flux2-klein-tiny", "seed": 1,
        "datasets": {"products": {"jsonl": "products.jsonl", "key": "{sku}"}},
        "matrix": {"product": "products"},
        "task": {"positivePrompt": "{product.sku}", "width": 128, "height": 128, "steps": 2,
                 "inputs": {"referenceImages": "{product.shots}"}},
        "output": {"filename": "{product.sku}.{ext}"},
    }))
    plan = plan_recipe(recipe, tmp_path / "out", max_batch=4)
    [batch] = make_batches(plan.results, plan.max_batch)
    shape = _loop_shape(batch)
    assert (shape.batch, shape.width, shape.height, shape.steps) == (4, 128, 128, 2)
    by_sku = {result.item.values["product"]["sku"]: row for row, result in enumerate(batch.results)}
    sets = shape.references
    assert len(sets) == 4 and sets[3] == sets[len(batch.results) - 1]  # the padding row repeats the last
    assert sets[by_sku["A"]] == sets[by_sku["C"]]  # one set by content, whatever the file
    assert sets[by_sku["A"]].sizes == ((96, 80),) and sets[by_sku["B"]].sizes == ((64, 64), (112, 128))
    assert isinstance(sets[by_sku["B"]], ReferenceSet) and sets[by_sku["A"]] != sets[by_sku["B"]]
    assert (shape.layout.reference_layout, shape.layout.reference_length) == ("rows", 80)  # 30 and 72 tokens
