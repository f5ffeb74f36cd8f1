"""Stable identities and content hashes: order-independence, ranges, what does and doesn't rehash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowgen.plan import compile_plan, derive_seed, item_id_for, result_seed
from flowgen.plan.seeds import SEED_MAX
from flowgen.recipe.api import Item

MODEL = {"card": "tiny", "weights": "abc"}


def make_item(key: str, prompt: str = "a cat", refs: tuple = (), **task) -> Item:
    base = {"positivePrompt": prompt, "width": 64, "height": 64, "steps": 2, "numberResults": 1,
            "outputFormat": "PNG", "CFGScale": 1.0}
    base.update(task)
    if refs:
        base["inputs"] = {"referenceImages": [str(r) for r in refs]}
    return Item(key=key, values={}, task=base, references=tuple(Path(r) for r in refs))


def plan_of(items, tmp_path, model=MODEL, seed=7):
    return compile_plan(recipe_name="r", recipe_seed=seed, items=items, out_dir=tmp_path,
                        filename=lambda item, i, ext: f"{item.key}_{i}.{ext}", model="tiny",
                        model_identity=model, distilled=False, recipe_hash="h")


def by_key(plan):
    return {(r.item.key, r.result_index): (r.seed, r.content_hash, r.item.item_id) for r in plan.results}


def test_derived_seed_is_documented_hash_in_spec_range():
    expected = int.from_bytes(hashlib.sha256(b"flowgen-seed\x007\x00p=1\x002").digest()[:8], "big") & SEED_MAX
    assert derive_seed(7, "p=1", 2) == expected
    seeds = {derive_seed(0, f"k{i}", j) for i in range(200) for j in range(3)}
    assert len(seeds) == 600 and all(0 <= s <= SEED_MAX for s in seeds)
    assert derive_seed(1, "k", 0) != derive_seed(2, "k", 0)  # the recipe seed matters


def test_explicit_task_seed_counts_up_per_result_and_wraps():
    assert [result_seed(100, 7, "k", i) for i in range(3)] == [100, 101, 102]
    assert result_seed(SEED_MAX, 7, "k", 1) == 0


def test_item_id_depends_on_key_and_recipe_only():
    assert item_id_for("r", "p=1") == item_id_for("r", "p=1")
    assert item_id_for("r", "p=1") != item_id_for("r2", "p=1")
    assert len(item_id_for("r", "p=1")) == 12


def test_reorder_add_remove_rows_changes_no_other_item(tmp_path):
    items = [make_item(f"p={i}", prompt=f"thing {i}", numberResults=2) for i in range(6)]
    base = by_key(plan_of(items, tmp_path))
    shuffled = by_key(plan_of(list(reversed(items)), tmp_path))
    grown = by_key(plan_of(items[:3] + [make_item("p=new")] + items[3:], tmp_path))
    shrunk = by_key(plan_of(items[1:], tmp_path))
    assert shuffled == base
    assert {k: v for k, v in grown.items() if k[0] != "p=new"} == base
    assert all(base[k] == v for k, v in shrunk.items())


def test_content_hash_tracks_image_fields_not_delivery_fields(tmp_path):
    h = lambda **t: plan_of([make_item("k", **t)], tmp_path).results[0].content_hash  # noqa: E731
    base = h()
    assert h(steps=3) != base
    assert h(outputFormat="JPG") != base
    assert h(outputQuality=80) != base
    assert h(webhookURL="https://x", includeCost=True, taskUUID="u", deliveryMethod="async") == base
    assert plan_of([make_item("k")], tmp_path, model={"card": "tiny", "weights": "other"}).results[0].content_hash != base
    assert h(seed=5) != base  # the seed is hashed


def test_more_results_keep_existing_hashes(tmp_path):
    two = by_key(plan_of([make_item("k", numberResults=2)], tmp_path))
    three = by_key(plan_of([make_item("k", numberResults=3)], tmp_path))
    assert {k: three[k] for k in two} == two and len(three) == 3


def test_reference_hashed_by_content_not_path(tmp_path):
    pixels = (np.arange(32 * 48 * 3) % 251).astype(np.uint8).reshape(32, 48, 3)
    a, b = tmp_path / "a.png", tmp_path / "sub" / "b.png"
    b.parent.mkdir()
    Image.fromarray(pixels).save(a)
    b.write_bytes(a.read_bytes())
    pa = plan_of([make_item("k", refs=(a,))], tmp_path).results[0]
    pb = plan_of([make_item("k", refs=(b,))], tmp_path).results[0]
    assert pa.content_hash == pb.content_hash
    assert pa.item.reference_sizes == ((48, 32),)
    Image.fromarray(255 - pixels).save(b)
    assert plan_of([make_item("k", refs=(b,))], tmp_path).results[0].content_hash != pa.content_hash


def test_unreadable_reference_marks_only_its_item(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    plan = plan_of([make_item("ok"), make_item("bad", refs=(bad,)), make_item("gone", refs=(tmp_path / "nope.png",))], tmp_path)
    errors = {i.key: i.error for i in plan.items}
    assert errors["ok"] is None
    assert "bad.png" in errors["bad"] and "not a readable image" in errors["bad"]
    assert "nope.png: does not exist" in errors["gone"]


def test_colliding_output_paths_are_a_user_error(tmp_path):
    from flowgen.errors import RecipeError

    with pytest.raises(RecipeError, match="both write"):
        compile_plan(recipe_name="r", recipe_seed=0, items=[make_item("a"), make_item("b")], out_dir=tmp_path,
                     filename=lambda item, i, ext: f"same.{ext}", model="tiny", model_identity=MODEL,
                     distilled=False, recipe_hash="h")


def test_guidance_off_for_distilled_or_low_cfg(tmp_path):
    items = [make_item("a", CFGScale=4.0), make_item("b", CFGScale=1.0)]
    plan = plan_of(items, tmp_path)
    assert [i.guidance for i in plan.items] == [4.0, None]
    distilled = compile_plan(recipe_name="r", recipe_seed=0, items=items, out_dir=tmp_path,
                             filename=lambda item, i, ext: f"{item.key}.{ext}", model="tiny",
                             model_identity=MODEL, distilled=True, recipe_hash="h")
    assert [i.guidance for i in distilled.items] == [None, None]


def test_the_step_cache_a_task_resolves_to_is_part_of_its_identity(tmp_path):
    """`acceleration` defaults to `high`, which caches base-model loops of many steps: a task that
    never names it must not hash as it did before step caches (its image differs); a loop that
    caches nothing (few steps, or a distilled model) keeps its old hash."""
    from flowgen.plan.hashing import BASE_DTYPE, ItemHasher, model_key

    def item_hash(steps, distilled, **task):
        plan = compile_plan(recipe_name="r", recipe_seed=0, items=[make_item("a", steps=steps, **task)],
                            out_dir=tmp_path, filename=lambda item, i, ext: f"{item.key}.{ext}", model="tiny",
                            model_identity=MODEL, distilled=distilled, recipe_hash="h")
        return plan.items[0].item_hash, ItemHasher(model_key(MODEL, BASE_DTYPE))(plan.items[0].task, [])

    cached, uncached_identity = item_hash(28, distilled=False)
    assert cached != uncached_identity
    assert item_hash(28, distilled=False, acceleration="none")[0] == item_hash(28, False, acceleration="none")[1]
    assert len({cached, item_hash(28, False, acceleration="low")[0], item_hash(28, False, acceleration="none")[0]}) == 3
    for steps, distilled in ((4, True), (28, True), (8, False)):
        ours, before = item_hash(steps, distilled)
        assert ours == before
