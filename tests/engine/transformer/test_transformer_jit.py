"""The runtime side of the CompiledTransformer: no retracing across steps, key-table facts, weight validation."""

from __future__ import annotations

import numpy as np
import pytest

from flowgen.engine.transformer import positions as ids
from flowgen.engine.transformer.compiled import TRACE_COUNTS, CompiledTransformer
from flowgen.engine.transformer.config import Flux2Config
from flowgen.errors import CheckpointError
from tests.engine.fixtures_transformer import TINY


def _random_bfl(config: Flux2Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in CompiledTransformer.expected_bfl_shapes(config).items()}


@pytest.fixture(scope="module")
def tensors():
    return _random_bfl(TINY, seed=3)


@pytest.fixture(scope="module")
def tiny(tensors):
    return CompiledTransformer.from_bfl_tensors(TINY, tensors)


@pytest.mark.slow
def test_four_step_loops_trace_once(tiny):
    rng = np.random.default_rng(0)
    h, w, n_txt = 3, 4, 5
    x = rng.standard_normal((2, h * w, 128)).astype(np.float32)
    txt = rng.standard_normal((2, n_txt, TINY.context_in_dim)).astype(np.float32)
    ref = rng.standard_normal((1, 6, 128)).astype(np.float32)
    x_ids, txt_ids, ref_ids = ids.image_ids(h, w), ids.text_ids(n_txt), ids.reference_ids([(2, 3)])
    shape = (2, h * w + 1, 128)  # a shape no other test compiles, so the first step must trace
    x = np.concatenate([x, x[:, :1]], axis=1)
    x_ids = np.concatenate([x_ids, x_ids[:1]])
    TRACE_COUNTS.clear()
    after_first = []
    for t in (1.0, 0.9, 0.7, 0.4):  # plain schedule
        x = x + (0.1 * tiny(x, x_ids, t, txt, txt_ids))
        after_first.append(dict(TRACE_COUNTS))
    kv = tiny.reference_kv(ref, ref_ids)
    for t in (1.0, 0.9, 0.7, 0.4):  # KV schedule: pre-pass once, every step cached
        x = x + (0.1 * tiny(x, x_ids, np.full((2,), t, np.float32), txt, txt_ids, ref_kv=kv))
    assert x.shape == shape and np.isfinite(np.asarray(x)).all()
    assert after_first == [{"forward": 1}] * 4, after_first
    assert TRACE_COUNTS["forward"] == 2, TRACE_COUNTS  # one plain program, one cached program
    assert TRACE_COUNTS["reference_prepass"] <= 1


def test_klein_9b_key_table():
    shapes = CompiledTransformer.expected_bfl_shapes(Flux2Config.named("klein-9b"))
    assert len(shapes) == 201
    assert sum(int(np.prod(s)) for s in shapes.values()) == 9_078_581_248
    assert shapes["single_blocks.23.linear1.weight"] == (36864, 4096)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (8192, 4096)
    klein4b = CompiledTransformer.expected_bfl_shapes(Flux2Config.named("klein-4b"))
    assert (len(klein4b), sum(int(np.prod(s)) for s in klein4b.values())) == (149, 3_875_544_576)


def test_from_bfl_tensors_places_every_tensor(tiny, tensors):
    p = tiny.params
    np.testing.assert_array_equal(p["double_blocks"]["img_attn"]["qkv"]["kernel"][1], tensors["double_blocks.1.img_attn.qkv.weight"].T)
    np.testing.assert_array_equal(p["double_blocks"]["txt_mlp"][2]["kernel"][0], tensors["double_blocks.0.txt_mlp.2.weight"].T)
    np.testing.assert_array_equal(p["single_blocks"]["norm"]["key_norm"]["scale"][1], tensors["single_blocks.1.norm.key_norm.scale"])
    np.testing.assert_array_equal(
        p["final_layer"]["adaLN_modulation"][1]["kernel"], tensors["final_layer.adaLN_modulation.1.weight"].T
    )


@pytest.mark.slow
def test_bfloat16_weights_track_float32(tiny, tensors):
    f32 = tiny
    bf16 = CompiledTransformer.from_bfl_tensors(TINY, tensors, dtype="bfloat16")
    assert bf16.params["img_in"]["kernel"].dtype == np.dtype("bfloat16")
    assert bf16.params["single_blocks"]["norm"]["query_norm"]["scale"].dtype == np.float32
    rng = np.random.default_rng(1)
    args = (rng.standard_normal((1, 12, 128)).astype(np.float32), ids.image_ids(3, 4), 0.6,
            rng.standard_normal((1, 5, TINY.context_in_dim)).astype(np.float32), ids.text_ids(5))
    a, b = np.asarray(f32(*args)), np.asarray(bf16(*args))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # bf16 rounding only, not a parity check


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda t: t.pop("single_blocks.1.linear2.weight"), "missing 1 tensor(s): single_blocks.1.linear2.weight"),
        (lambda t: t.update({"guidance_in.in_layer.weight": np.zeros((64, 256))}), "unexpected 1 tensor(s): guidance_in"),
        (lambda t: t.update({"img_in.weight": np.zeros((64, 64))}), "img_in.weight (64, 64) (expected (64, 128))"),
    ],
)
def test_bad_weights_raise_checkpoint_error(edit, needle, tensors):
    tensors = dict(tensors)
    edit(tensors)
    with pytest.raises(CheckpointError) as err:
        CompiledTransformer.from_bfl_tensors(TINY, tensors)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unsupported_dtype_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="float16"):
        CompiledTransformer.random(TINY, dtype="float16")
