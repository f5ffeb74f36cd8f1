"""The FLUX.2 [klein] DiT as a Flax NNX module, and its three computations.

* `forward` — plain step over [txt, img] tokens; optionally with cached reference K/V
  (`ref_kv`) appended as extra keys in every layer (the KV model's cached step; also step 0).
* `reference_prepass` — reference tokens alone, modulated at t = 0, attending only among
  themselves (double blocks use the image-stream weights); returns every layer's post-RoPE K/V.

Both take the module (merged from params inside jit by `transformer.Transformer`) and RoPE
tables from `rope.rope_tables` (host float64 angles, so the jitted code sees float32 cos/sin).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flowgen.engine import time_embedding
from flowgen.engine.config import Flux2Config
from flowgen.engine.transformer_blocks import (
    DoubleStreamBlock,
    Linear,
    Rope,
    SiLU,
    SingleStreamBlock,
    modulate,
    scan_layers,
)


class ReferenceKV(NamedTuple):
    """Post-QK-norm, post-RoPE reference K/V of every layer: (layers, B, heads, R, head_dim) each."""

    double_k: jnp.ndarray
    double_v: jnp.ndarray
    single_k: jnp.ndarray
    single_v: jnp.ndarray


def _round_to(x: jnp.ndarray, dtype) -> jnp.ndarray:
    """float32 x rounded to `dtype`'s precision, still float32. Not `astype(dtype).astype(float32)`:
    under jit XLA drops such convert pairs (excess precision allowed), so nothing would round."""
    if jnp.dtype(dtype) == jnp.float32:
        return x
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def timestep_embedding(t: jnp.ndarray, dim: int, dtype=jnp.float32) -> jnp.ndarray:
    """Sinusoidal embedding of 1000·t, [cos | sin], in float32 (t is the flow time in [0, 1]).

    As diffusers (`timestep.to(hidden_states.dtype) * 1000`, then `.float()` times its float32 table)
    and BFL, t and 1000·t are rounded to the model dtype: a no-op in float32, 4 apart near 1000 in
    bf16. (The float32 product of two bf16 values is exact, so rounding it once is bf16's multiply.)"""
    freqs = jnp.asarray(time_embedding.frequencies(dim // 2))
    scaled = _round_to(_round_to(t.astype(jnp.float32), dtype) * 1000, dtype)
    args = scaled[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPEmbedder(nnx.Module):
    def __init__(self, d_in: int, dim: int, *, rngs, dtype):
        self.in_layer = Linear(d_in, dim, rngs=rngs, dtype=dtype)
        self.out_layer = Linear(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class Modulation(nnx.Module):
    """Global modulation: lin(silu(vec)) split into `sets` (shift, scale, gate) triples of shape (B, 1, H)."""

    def __init__(self, dim: int, sets: int, *, rngs, dtype):
        self.sets = sets
        self.lin = Linear(dim, 3 * sets * dim, rngs=rngs, dtype=dtype)

    def __call__(self, vec):
        chunks = jnp.split(self.lin(jax.nn.silu(vec))[:, None, :], 3 * self.sets, axis=-1)
        return tuple(tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.sets))


class LastLayer(nnx.Module):
    def __init__(self, dim: int, out_channels: int, eps: float, *, rngs, dtype):
        self.eps = eps
        self.linear = Linear(dim, out_channels, rngs=rngs, dtype=dtype)
        self.adaLN_modulation = nnx.List([SiLU(), Linear(dim, 2 * dim, rngs=rngs, dtype=dtype)])

    def __call__(self, x, vec):
        shift, scale = jnp.split(self.adaLN_modulation[1](jax.nn.silu(vec))[:, None, :], 2, axis=-1)  # BFL order
        return self.linear(modulate(x, shift, scale, self.eps))


class Flux2DiT(nnx.Module):
    def __init__(self, config: Flux2Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        c, h = config, config.hidden_size
        self.dtype = jnp.dtype(dtype)
        self.timestep_dim = c.timestep_dim
        self.img_in = Linear(c.in_channels, h, rngs=rngs, dtype=dtype)
        self.txt_in = Linear(c.context_in_dim, h, rngs=rngs, dtype=dtype)
        self.time_in = MLPEmbedder(c.timestep_dim, h, rngs=rngs, dtype=dtype)
        self.double_stream_modulation_img = Modulation(h, 2, rngs=rngs, dtype=dtype)
        self.double_stream_modulation_txt = Modulation(h, 2, rngs=rngs, dtype=dtype)
        self.single_stream_modulation = Modulation(h, 1, rngs=rngs, dtype=dtype)
        block_args = (h, c.num_heads, c.mlp_hidden, c.eps)
        self.double_blocks = DoubleStreamBlock(*block_args, rngs=rngs, dtype=dtype, stack=(c.depth,))
        self.single_blocks = SingleStreamBlock(*block_args, rngs=rngs, dtype=dtype, stack=(c.depth_single_blocks,))
        self.final_layer = LastLayer(h, c.in_channels, c.eps, rngs=rngs, dtype=dtype)

    def vec(self, t: jnp.ndarray) -> jnp.ndarray:
        return self.time_in(timestep_embedding(t, self.timestep_dim, self.dtype).astype(self.dtype))


def forward(
    model: Flux2DiT,
    x: jnp.ndarray,
    rope_img: Rope,
    t: jnp.ndarray,
    txt: jnp.ndarray,
    rope_txt: Rope,
    ref_kv: ReferenceKV | None = None,
    key_lengths: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Velocity for x (B, N, C) at times t (B,) given text (B, T, ctx); cached reference K/V optional.

    rope_img may be per row ((B, N, d/2) tables: concatenated references that differ per row);
    key_lengths (B,) masks each row's padded tail of [txt, x, ref_kv] (see `attention`)."""
    x, txt = x.astype(model.dtype), txt.astype(model.dtype)
    vec = model.vec(t)
    mod_img = model.double_stream_modulation_img(vec)
    mod_txt = model.double_stream_modulation_txt(vec)
    (mod_single,) = model.single_stream_modulation(vec)
    img, ctx = model.img_in(x), model.txt_in(txt)

    def double(block, carry, kv):
        return block(*carry, rope_img, rope_txt, mod_img, mod_txt, ref_kv=kv, key_lengths=key_lengths), None

    kv_double = None if ref_kv is None else (ref_kv.double_k, ref_kv.double_v)
    (img, ctx), _ = scan_layers(model.double_blocks, double, (img, ctx), kv_double)

    n_txt = ctx.shape[1]
    h = jnp.concatenate([ctx, img], axis=1)
    if rope_img[0].ndim == 3:  # per-row image tables: the text tables join every row
        rope_txt = tuple(jnp.broadcast_to(a, (rope_img[0].shape[0], *a.shape)) for a in rope_txt)
    rope = tuple(jnp.concatenate([a, b], axis=-2) for a, b in zip(rope_txt, rope_img))

    def single(block, carry, kv):
        return block(carry, rope, mod_single, ref_kv=kv, key_lengths=key_lengths), None

    kv_single = None if ref_kv is None else (ref_kv.single_k, ref_kv.single_v)
    h, _ = scan_layers(model.single_blocks, single, h, kv_single)
    return model.final_layer(h[:, n_txt:], vec).astype(jnp.float32)


def reference_prepass(model: Flux2DiT, ref: jnp.ndarray, rope_ref: Rope, key_lengths=None) -> ReferenceKV:
    """K/V of reference tokens (B, R, C) in every layer: t = 0 modulation, reference-only attention.

    key_lengths (B,): real tokens per row; the padded tail is masked as keys (its own K/V come out
    finite and are masked again wherever they are attended)."""
    ref = ref.astype(model.dtype)
    vec0 = model.vec(jnp.zeros((ref.shape[0],), jnp.float32))
    mod_double = model.double_stream_modulation_img(vec0)
    (mod_single,) = model.single_stream_modulation(vec0)
    h = model.img_in(ref)

    def double(block, carry, _):
        return block.reference(carry, rope_ref, mod_double, key_lengths)

    h, (double_k, double_v) = scan_layers(model.double_blocks, double, h)

    last = model.single_blocks.linear1.kernel.shape[0] - 1

    def single(block, carry, index):
        # the last layer's residual update is never used: compute only its K/V
        def full(c):
            return block.reference(c, rope_ref, mod_single, key_lengths)

        def kv_only(c):
            return c, block.reference_kv(c, rope_ref, mod_single)

        return jax.lax.cond(index == last, kv_only, full, carry)

    _, (single_k, single_v) = scan_layers(model.single_blocks, single, h, jnp.arange(last + 1))
    return ReferenceKV(double_k, double_v, single_k, single_v)
