"""Batching: power-of-two sizes, grouping by shape signature, shared reference sets together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flowgen.plan import chunk_sizes, compile_plan, make_batches
from flowgen.recipe.api import Item


def item(key, prompt="p", refs=(), **task):
    base = {"positivePrompt": prompt, "width": 64, "height": 64, "steps": 2, "numberResults": 1, "outputFormat": "PNG"}
    base.update(task)
    return Item(key=key, values={}, task=base, references=tuple(Path(r) for r in refs))


def plan_of(items, tmp_path, max_batch=8):
    return compile_plan(recipe_name="r", recipe_seed=0, items=items, out_dir=tmp_path,
                        filename=lambda it, i, ext: f"{it.key}_{i}.{ext}", model="tiny",
                        model_identity={"m": 1}, distilled=False, recipe_hash="h", max_batch=max_batch)


def test_chunk_sizes_are_powers_of_two_with_little_padding():
    assert chunk_sizes(8, 8) == [(8, 8)]
    assert chunk_sizes(13, 8) == [(8, 8), (4, 4), (1, 1)]
    assert chunk_sizes(7, 8) == [(7, 8)]  # one slot of padding beats three calls
    assert chunk_sizes(3, 8) == [(3, 4)]
    assert chunk_sizes(5, 8) == [(4, 4), (1, 1)]
    assert chunk_sizes(20, 6) == [(4, 4)] * 5  # max_batch rounds down to a power of two
    for n in range(1, 70):
        chunks = chunk_sizes(n, 16)
        assert sum(c for c, _ in chunks) == n
        assert all(s & (s - 1) == 0 and c <= s <= 16 for c, s in chunks)


def test_batches_never_mix_signatures(tmp_path):
    items = [item(f"a{i}") for i in range(5)] + [item(f"b{i}", width=128) for i in range(3)] + \
            [item(f"c{i}", steps=4) for i in range(2)] + [item(f"d{i}", CFGScale=3.0) for i in range(2)]
    plan = plan_of(items, tmp_path)
    batches = make_batches(plan.results, plan.max_batch)
    for batch in batches:
        assert len({r.item.signature for r in batch.results}) == 1
    assert sum(len(b.results) for b in batches) == 12
    assert len({b.signature for b in batches}) == 4


def test_mixed_reference_sizes_batch_together_with_sets_grouped(tmp_path):
    """A catalogue of packshots of different sizes (and items without references) shares batches:
    the engine stacks each row's references, so only the output size, steps, guidance and
    scheduler split batches."""
    refs = []
    for name, size in [("x", (300, 400)), ("y", (640, 480)), ("z", (96, 64))]:
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.full((size[1], size[0], 3), ord(name), np.uint8)).save(path)
        refs.append(path)
    x, y, z = refs
    items = [item(f"k{i}", refs=((x,) if i % 2 else (y,))) for i in range(8)] + [item("big", refs=(z,))]
    items += [item(f"t{i}") for i in range(3)]  # text-to-image items of the same size
    plan = plan_of(items, tmp_path, max_batch=4)
    batches = make_batches(plan.results, 4)
    assert [b.size for b in batches] == [4, 4, 4]
    assert len({b.signature for b in batches}) == 1
    # sets stay together: the first two batches each hold one reference set (a copy-free shared K/V)
    assert [len({r.item.reference_set for r in b.results}) for b in batches[:2]] == [1, 1]
    assert make_batches(plan_of(items, tmp_path, max_batch=4).results, 4)[0].signature == (64, 64, 2, None, "Default", "high", (), ())


def test_the_scheduler_splits_batches(tmp_path):
    items = [item(f"a{i}") for i in range(2)] + [item(f"b{i}", scheduler="DPM++ 2M") for i in range(2)]
    batches = make_batches(plan_of(items, tmp_path).results, 8)
    assert sorted(b.signature[4] for b in batches) == ["DPM++ 2M", "Default"]


def test_batches_are_deterministic_regardless_of_item_order(tmp_path):
    items = [item(f"k{i}", prompt=f"p{i % 3}") for i in range(11)]
    ids = lambda b: [[r.rid for r in x.results] for x in b]  # noqa: E731
    first = ids(make_batches(plan_of(items, tmp_path).results, 8))
    again = ids(make_batches(plan_of(list(reversed(items)), tmp_path).results, 8))
    assert first == again
