"""The FLUX.2 [klein] transformer (a DiT) as a Flax NNX module, and its computations.

* `forward` — plain step over [txt, img] tokens; optionally with cached reference K/V
  (`ref_kv`) appended as extra keys in every layer (the KV model's cached step; also step 0).
  It is the composition of its stages `embed` -> `run_blocks` over a `block_range` -> `velocity`,
  which the step caches (sampling/step_cache.py) run over parts of the block stack; the range
  that ends the stack runs through `image_after`, whose last block skips the text rows' queries
  and MLP (only the image tokens are read after it).
* `reference_prepass` — reference tokens alone, modulated at t = 0, attending only among
  themselves (double blocks use the image-stream weights); returns every layer's post-RoPE K/V.

Both take the module (merged from params inside jit by `compiled.CompiledTransformer`) and RoPE
tables from `rope.rope_tables` (host float64 angles, so the jitted code sees float32 cos/sin).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flowgen.engine.transformer import time_embedding
from flowgen.engine.transformer.blocks import (
    KV,
    DoubleStreamBlock,
    Linear,
    Rope,
    SiLU,
    SingleStreamBlock,
    modulate,
    scan_layers,
)
from flowgen.engine.transformer.config import Flux2Config


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


class Flux2Transformer(nnx.Module):
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


# ---- the forward, in stages ----------------------------------------------------------------------
#
#   embed -> run_blocks(block_range(...)) -> velocity
#
# `forward` is exactly that composition; the step-cached loop (sampling/step_cache.py) runs the same stages
# over three block ranges (front, middle, back) so that a step can reuse the middle's residual.
# The reference K/V cache is an argument of the blocks: `block_range` hands each range its layers' K/V.


class TransformerStages(NamedTuple):
    """What the step-cached loop needs of a compiled transformer to run these stages (hashable: its
    graphdef and attention path are static arguments of the loop's jit)."""

    graphdef: nnx.GraphDef[Flux2Transformer]
    attention: str | None
    gather: object = None  # the layers' gathering sharding when the block weights are split (runtime/placement.py)


# The token streams between stages: (img, txt) while in the double blocks, the joint [txt, img]
# array once the single blocks have started.
Streams = tuple[jnp.ndarray, jnp.ndarray] | jnp.ndarray


class StepInputs(NamedTuple):
    """What every block of one step reads besides the tokens (made once per step by `embed`)."""

    vec: jnp.ndarray  # time embedding (B, H): the modulations and the final layer's input
    mod_img: tuple  # double blocks' image-stream modulation ((shift, scale, gate) x 2)
    mod_txt: tuple  # double blocks' text-stream modulation
    mod_single: tuple  # single blocks' modulation (shift, scale, gate)
    rope_img: Rope  # image tables: (N, d/2) or per row (B, N, d/2)
    rope_txt: Rope
    rope: Rope  # the single blocks' joint [txt, img] tables
    n_txt: int  # text tokens in front of the image tokens of the joint stream
    key_lengths: jnp.ndarray | None  # (B,) valid keys per row over [txt, img, ref K/V]; None: all


class BlockRange(NamedTuple):
    """Blocks [start, stop) of the double-then-single stack: the layers (stacked modules, sliced
    unless the range covers a whole stack) and their reference K/V (None: no references)."""

    double: DoubleStreamBlock | None
    single: SingleStreamBlock | None
    double_kv: KV | None
    single_kv: KV | None


def embed(
    model: Flux2Transformer, x, rope_img: Rope, t, txt, rope_txt: Rope, key_lengths=None
) -> tuple[StepInputs, Streams]:
    """The head: time embedding, modulations, RoPE tables and the embedded (img, txt) streams."""
    x, txt = x.astype(model.dtype), txt.astype(model.dtype)
    vec = model.vec(t)
    mod_img = model.double_stream_modulation_img(vec)
    mod_txt = model.double_stream_modulation_txt(vec)
    (mod_single,) = model.single_stream_modulation(vec)
    inputs = StepInputs(
        vec,
        mod_img,
        mod_txt,
        mod_single,
        rope_img,
        rope_txt,
        _joint_rope(rope_img, rope_txt),
        txt.shape[1],
        key_lengths,
    )
    return inputs, (model.img_in(x), model.txt_in(txt))


def _joint_rope(rope_img: Rope, rope_txt: Rope) -> Rope:
    (cos_txt, sin_txt), (cos_img, sin_img) = rope_txt, rope_img
    if cos_img.ndim == 3:  # per-row image tables: the text tables join every row
        rows = cos_img.shape[0]
        cos_txt, sin_txt = (
            jnp.broadcast_to(cos_txt, (rows, *cos_txt.shape)),
            jnp.broadcast_to(sin_txt, (rows, *sin_txt.shape)),
        )
    return jnp.concatenate([cos_txt, cos_img], axis=-2), jnp.concatenate([sin_txt, sin_img], axis=-2)


def num_blocks(model: Flux2Transformer) -> tuple[int, int]:
    """(double, single) stack depths."""
    return model.double_blocks.img_attn.qkv.kernel.shape[0], model.single_blocks.linear1.kernel.shape[0]


def block_range(
    model: Flux2Transformer, ref_kv: ReferenceKV | None = None, start: int = 0, stop: int | None = None
) -> BlockRange:
    """Blocks [start, stop) (default: all) with their slice of the reference K/V.

    Slicing copies the weights: make a range once, outside a loop's steps."""
    depth, depth_single = num_blocks(model)
    stop = depth + depth_single if stop is None else stop
    double, double_kv = _layers(
        model.double_blocks,
        None if ref_kv is None else (ref_kv.double_k, ref_kv.double_v),
        start,
        min(stop, depth),
        depth,
    )
    single, single_kv = _layers(
        model.single_blocks,
        None if ref_kv is None else (ref_kv.single_k, ref_kv.single_v),
        max(start, depth) - depth,
        stop - depth,
        depth_single,
    )
    return BlockRange(double, single, double_kv, single_kv)


def _layers(stacked, kv, start: int, stop: int, depth: int):
    """Layers [start, stop) of a stacked block module and of its K/V: (None, None) if empty."""
    if start >= stop:
        return None, None
    if (start, stop) == (0, depth):
        return stacked, kv
    graphdef, state = nnx.split(stacked)
    layers = nnx.merge(graphdef, jax.tree.map(lambda p: p[start:stop], state))
    return layers, None if kv is None else tuple(a[start:stop] for a in kv)


def run_blocks(inputs: StepInputs, streams: Streams, blocks: BlockRange) -> Streams:
    """Run a block range on the streams; entering the single blocks joins them as [txt, img]."""
    if blocks.double is not None:

        def double(block, carry, kv):
            return block(
                *carry,
                inputs.rope_img,
                inputs.rope_txt,
                inputs.mod_img,
                inputs.mod_txt,
                ref_kv=kv,
                key_lengths=inputs.key_lengths,
            ), None

        streams, _ = scan_layers(blocks.double, double, streams, blocks.double_kv)
    if blocks.single is not None:
        h = joint_tokens(streams)

        def single(block, carry, kv):
            return block(carry, inputs.rope, inputs.mod_single, ref_kv=kv, key_lengths=inputs.key_lengths), None

        streams, _ = scan_layers(blocks.single, single, h, blocks.single_kv)
    return streams


def image_after(inputs: StepInputs, streams: Streams, blocks: BlockRange) -> jnp.ndarray:
    """`image_tokens(run_blocks(inputs, streams, blocks))`, for a range after which only the image
    tokens are read (the end of the stack): its last single block computes its image rows alone
    (`SingleStreamBlock.image_rows`; the text rows still give keys and values)."""
    if blocks.single is None:
        return image_tokens(run_blocks(inputs, streams, blocks), inputs.n_txt)
    n_txt = inputs.n_txt
    h = joint_tokens(run_blocks(inputs, streams, blocks._replace(single=None, single_kv=None)))
    last = blocks.single.linear1.kernel.shape[0] - 1

    def single(block, carry, per_layer):
        kv, index = per_layer

        def full(c):
            return block(c, inputs.rope, inputs.mod_single, ref_kv=kv, key_lengths=inputs.key_lengths)

        def image_only(c):  # same shape as `full`'s: the text rows pass through unread
            img = block.image_rows(c, inputs.rope, inputs.mod_single, n_txt, ref_kv=kv, key_lengths=inputs.key_lengths)
            return jnp.concatenate([c[:, :n_txt], img], axis=1)

        return jax.lax.cond(index == last, image_only, full, carry), None

    h, _ = scan_layers(blocks.single, single, h, (blocks.single_kv, jnp.arange(last + 1)))
    return h[:, n_txt:]


def image_tokens(streams: Streams, n_txt: int) -> jnp.ndarray:
    """The image stream (B, N, H) of either form of the streams."""
    return streams[0] if isinstance(streams, tuple) else streams[:, n_txt:]


def joint_tokens(streams: Streams) -> jnp.ndarray:
    """The joint [txt, img] stream (B, T + N, H) of either form of the streams."""
    return jnp.concatenate([streams[1], streams[0]], axis=1) if isinstance(streams, tuple) else streams


def velocity(model: Flux2Transformer, inputs: StepInputs, img: jnp.ndarray) -> jnp.ndarray:
    """The final layer: image tokens (B, N, H) -> velocity (B, N, C) in float32."""
    return model.final_layer(img, inputs.vec).astype(jnp.float32)


def forward(
    model: Flux2Transformer,
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
    inputs, streams = embed(model, x, rope_img, t, txt, rope_txt, key_lengths)
    return velocity(model, inputs, image_after(inputs, streams, block_range(model, ref_kv)))


def reference_prepass(model: Flux2Transformer, ref: jnp.ndarray, rope_ref: Rope, key_lengths=None) -> ReferenceKV:
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
