"""Runs driven through `execute()` directly on the FakeEngine: a plan compiled from hand-made items, a reference
image on disk, delivery options that retry without waiting, and the deliveries a run recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flowgen.delivery.http import RetryPolicy
from flowgen.plan import compile_plan
from flowgen.recipe.api import Item
from flowgen.run.manifest import Manifest


def item(key, refs=(), **task):
    """An item whose task is a 64x64 PNG, 2 steps, one result, with `task` fields over it."""
    base = {"positivePrompt": f"prompt {key}", "width": 64, "height": 64, "steps": 2, "numberResults": 1,
            "outputFormat": "PNG", "outputQuality": 90}
    base.update(task)
    return Item(key=key, values={}, task=base, references=tuple(Path(r) for r in refs))


def plan_of(items, out, max_batch=4):
    """The plan of `items` for the tiny model, writing img/<key>_<result>.<ext> under `out`."""
    return compile_plan(recipe_name="r", recipe_seed=3, items=items, out_dir=out,
                        filename=lambda it, i, ext: f"img/{it.key}_{i}.{ext}", model="tiny",
                        model_identity={"m": 1}, distilled=False, recipe_hash="h", max_batch=max_batch)


def reference(tmp_path, name="ref.png", value=40):
    path = tmp_path / name
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(path)
    return path


# retries at once: no test waits for a backoff
FAST = {"policy": RetryPolicy(max_attempts=3, base_delay_s=0.0, timeout_s=2.0, sleep=lambda s: None)}


def deliveries(out) -> dict[tuple[str, int, str], dict]:
    with Manifest(out) as manifest:
        return {(d["item_id"], d["result_index"], d["sink"]): d for d in manifest.deliveries()}
