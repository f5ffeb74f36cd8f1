"""The stack's last single block computes only what is read after it: its image rows (the text rows
still give keys and values), with the velocity the full block gives."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgen.engine.transformer import model as transformer
from flowgen.engine.transformer.compiled import CompiledTransformer
from flowgen.engine.transformer.config import Flux2Config
from flowgen.engine.transformer.positions import image_ids, reference_ids, text_ids

CONFIG = Flux2Config(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=2, context_in_dim=48,
                     axes_dim=(8, 8, 8, 8))
B, H, W, T, R = 2, 4, 4, 8, 12


def _setup():
    tr = CompiledTransformer.random(CONFIG, seed=0)
    x = jax.random.normal(jax.random.key(0), (B, H * W, 128))
    txt = jax.random.normal(jax.random.key(1), (B, T, 48))
    t = jnp.asarray([0.9, 0.4], jnp.float32)
    lengths = jnp.asarray([R, 7], jnp.int32)  # row 1's references are padded: its tail is masked
    refs = jax.random.normal(jax.random.key(2), (B, R, 128))
    kv = tr.reference_kv(refs, reference_ids([(3, 4)]), key_lengths=lengths)
    args = (x, tr.rope(image_ids(H, W)), t, txt, tr.rope(text_ids(T)))
    return tr, args, kv, T + H * W + lengths


def _every_block_in_full(graphdef, params, args, ref_kv, key_lengths):
    """The forward as it was: every block over every row, then the image rows."""
    model = nnx.merge(graphdef, params)
    inputs, streams = transformer.embed(model, *args, key_lengths)
    streams = transformer.run_blocks(inputs, streams, transformer.block_range(model, ref_kv))
    return transformer.velocity(model, inputs, transformer.image_tokens(streams, inputs.n_txt))


def _dot_lhs_shapes(jaxpr) -> set[tuple[int, ...]]:
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.add(tuple(eqn.invars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes |= _dot_lhs_shapes(sub)
    return shapes


def test_the_velocity_is_the_full_blocks_one():
    tr, args, kv, key_lengths = _setup()
    for ref_kv, lengths in ((None, None), (kv, key_lengths)):
        full = jax.jit(_every_block_in_full, static_argnums=0)(tr.graphdef, tr.params, args, ref_kv, lengths)
        fast = tr.forward_fn(tr.params, *args, ref_kv, lengths)
        np.testing.assert_allclose(np.asarray(fast), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_the_last_block_runs_linear2_on_the_image_rows_only():
    tr, args, _, _ = _setup()
    jaxpr = jax.make_jaxpr(tr.forward_fn)(tr.params, *args).jaxpr
    joint, image = (B, T + H * W, CONFIG.hidden_size * 4), (B, H * W, CONFIG.hidden_size * 4)  # linear2's input
    shapes = _dot_lhs_shapes(jaxpr)
    assert joint in shapes  # the other single block: every row
    assert image in shapes  # the last one: the image rows alone
