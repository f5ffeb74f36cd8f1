"""The GPU attention path (concatenated keys + `jax.nn.dot_product_attention`) computes what the CPU
path (per image, separate reference operand, deferred softmax) does — checked here on CPU, so a
session lent a GPU does not spend its minutes finding a broadcasting or layout bug."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowgen.engine.transformer import attention as attn
from flowgen.engine.transformer import model as transformer
from flowgen.engine.transformer import positions as ids
from flowgen.engine.transformer.compiled import CompiledTransformer
from tests.engine.fixtures_transformer import TINY


def _arrays(rng, *shapes):
    return [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]


@pytest.mark.parametrize("ref_batch", [None, 1, 3])
def test_gpu_and_cpu_attention_agree(ref_batch):
    rng = np.random.default_rng(ref_batch or 0)
    q, k, v = _arrays(rng, (3, 4, 37, 16), (3, 4, 37, 16), (3, 4, 37, 16))
    extra = None if ref_batch is None else tuple(_arrays(rng, (ref_batch, 4, 50, 16), (ref_batch, 4, 50, 16)))
    cpu = attn._cpu(q, k, v, extra)
    gpu = attn._gpu(q, *attn.concat_keys(k, v, extra))
    keys, values = k, v  # the reference joins the keys itself (numpy broadcasting, not concat_keys)
    if extra is not None:
        keys = jnp.asarray(np.concatenate([k, np.broadcast_to(extra[0], (3, 4, 50, 16))], axis=2))
        values = jnp.asarray(np.concatenate([v, np.broadcast_to(extra[1], (3, 4, 50, 16))], axis=2))
    dense = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, keys) / np.sqrt(q.shape[-1]), axis=-1)
    reference = jnp.einsum("bhqk,bhkd->bhqd", dense, values)
    np.testing.assert_allclose(np.asarray(gpu), np.asarray(reference), atol=2e-6)
    np.testing.assert_allclose(np.asarray(cpu), np.asarray(reference), atol=2e-6)


def test_gpu_path_in_bfloat16_falls_back_without_cudnn():
    rng = np.random.default_rng(5)
    q, k, v = (a.astype(jnp.bfloat16) for a in _arrays(rng, (2, 4, 20, 16), (2, 4, 20, 16), (2, 4, 20, 16)))
    out = attn._gpu(q, k, v)  # cudnn is unavailable here: the XLA implementation must take over
    expected = attn._cpu(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), None)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), atol=3e-2)


@pytest.mark.slow
def test_whole_model_on_the_gpu_path_matches_the_cpu_path(monkeypatch):
    tr = CompiledTransformer.random(TINY, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 12, 128)).astype(np.float32)
    txt = rng.standard_normal((2, 5, TINY.context_in_dim)).astype(np.float32)
    ref = rng.standard_normal((1, 6, 128)).astype(np.float32)
    rope_x, rope_t = tr.rope(ids.image_ids(3, 4)), tr.rope(ids.text_ids(5))
    rope_r = tr.rope(ids.reference_ids([(2, 3)]))
    t = jnp.full((2,), 0.6, jnp.float32)

    def run():  # a new function each call, so jit traces afresh and sees the patched path choice
        def prepass_then_cached_step(params):
            module = nnx.merge(tr.graphdef, params)
            kv = transformer.reference_prepass(module, jnp.asarray(ref), rope_r)  # batch 1, serves batch 2
            return transformer.forward(module, jnp.asarray(x), rope_x, t, jnp.asarray(txt), rope_t, kv)

        return np.asarray(jax.jit(prepass_then_cached_step)(tr.params))

    on_cpu = run()
    monkeypatch.setattr(attn, "use_gpu_kernels", lambda: True)
    on_gpu = run()
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-5 * max(1.0, float(np.abs(on_cpu).max())))
