"""Step caches inside the compiled sampling loop (TeaCache, FBCache, DBCache; settings in
`step_cache_settings`).

The DiT runs in three stages so that a step can stop after its front blocks:

    head + front blocks  (always)  -> the signal, and the decision (one scalar for the batch)
    middle blocks        (lax.cond: run and store their residual, or add the stored residual)
    back blocks + final  (always)

The cache state (anchor, residual, accumulator, consecutive count, and a per-step record of the
distance and decision) rides in the `fori_loop` carry. One decision per sampler step, made at the
step's first model call; a sampler's further calls in that step (Heun, DPM2, SDE stages) follow
it without touching the state: on a skipped step they reuse the residual too. Multistep samplers
get the cached velocity as the model output, like any other.

Distances are relative L1, mean|a − b| / mean|b| per row in float32, then the max over the rows
(CFG halves included): a batch computes a step whenever any of its rows would.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flowgen.engine.attention import attention_path
from flowgen.engine.step_cache_settings import StepCache
from flowgen.engine.transformer_blocks import modulate, scan_layers


class StepCacheState(NamedTuple):
    anchor: jax.Array  # teacache: last step's modulated input; fb/db: front residual of the last computed step
    residual: jax.Array  # what the middle blocks added on the last computed step
    accumulated: jax.Array  # teacache's rescaled distance summed since the last computed step
    consecutive: jax.Array  # cached steps since the last computed step
    distances: jax.Array  # (steps,) the raw distance of every step (NaN at step 0)
    computed: jax.Array  # (steps,) bool: the step ran its middle blocks


class DiTStages(NamedTuple):
    """What the cached loop needs of a transformer (hashable: graphdef and attention path)."""

    graphdef: object
    attention: str | None


def relative_l1(a: jax.Array, b: jax.Array) -> jax.Array:
    """max over rows of mean|a − b| / mean|b|, in float32 (a, b: (B, ...))."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    axes = tuple(range(1, a.ndim))
    num = jnp.mean(jnp.abs(a - b), axis=axes)
    den = jnp.mean(jnp.abs(b), axis=axes)
    return jnp.max(num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny))


# ---- the staged DiT (mirrors dit.forward) -------------------------------------------------------


class _Context(NamedTuple):
    vec: jax.Array
    mod_img: tuple
    mod_txt: tuple
    mod_single: tuple
    rope_img: tuple
    rope_txt: tuple
    rope: tuple  # joint [txt, img] tables of the single blocks
    n_txt: int
    ref_kv: object
    key_lengths: object


def _joint_rope(rope_img, rope_txt):
    if rope_img[0].ndim == 3:  # per-row image tables: the text tables join every row
        rope_txt = tuple(jnp.broadcast_to(a, (rope_img[0].shape[0], *a.shape)) for a in rope_txt)
    return tuple(jnp.concatenate([a, b], axis=-2) for a, b in zip(rope_txt, rope_img))


def _head(model, x, rope_img, t, txt, rope_txt, ref_kv, key_lengths):
    x, txt = x.astype(model.dtype), txt.astype(model.dtype)
    vec = model.vec(t)
    mod_img = model.double_stream_modulation_img(vec)
    mod_txt = model.double_stream_modulation_txt(vec)
    (mod_single,) = model.single_stream_modulation(vec)
    ctx = _Context(vec, mod_img, mod_txt, mod_single, rope_img, rope_txt, _joint_rope(rope_img, rope_txt),
                   txt.shape[1], ref_kv, key_lengths)
    return ctx, (model.img_in(x), model.txt_in(txt))


def _sliced(stacked, start: int, stop: int):
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda p: p[start:stop], state))


class Segment(NamedTuple):
    """The blocks [start, stop) of the double-then-single stack: their weights (sliced modules) and
    reference K/V, sliced once before the loop — slicing inside a step would copy them every step."""

    double: object  # sliced DoubleStreamBlock stack, or None
    single: object  # sliced SingleStreamBlock stack, or None
    double_kv: object
    single_kv: object


def segment(model, ref_kv, start: int, stop: int) -> Segment:
    depth = model.double_blocks.img_attn.qkv.kernel.shape[0]
    double = single = double_kv = single_kv = None
    if start < min(stop, depth):
        a, b = start, min(stop, depth)
        double = _sliced(model.double_blocks, a, b)
        double_kv = None if ref_kv is None else (ref_kv.double_k[a:b], ref_kv.double_v[a:b])
    if stop > depth:
        a, b = max(start, depth) - depth, stop - depth
        single = _sliced(model.single_blocks, a, b)
        single_kv = None if ref_kv is None else (ref_kv.single_k[a:b], ref_kv.single_v[a:b])
    return Segment(double, single, double_kv, single_kv)


def segments(stages: DiTStages, params, cache: StepCache, ref_kv) -> tuple[Segment, Segment, Segment]:
    """(front, middle, back) segments of a cache's block split."""
    model = nnx.merge(stages.graphdef, params)
    total = _num_blocks(model)
    bounds = (0, cache.front, total - cache.back, total)
    return tuple(segment(model, ref_kv, a, b) for a, b in zip(bounds, bounds[1:]))


def _run_blocks(c: _Context, streams, seg: Segment):
    """Run a segment. `streams` is (img, ctx) while in the double blocks and the joint [txt, img]
    array after them."""
    if seg.double is not None:
        def double(block, carry, layer_kv):
            return block(*carry, c.rope_img, c.rope_txt, c.mod_img, c.mod_txt, ref_kv=layer_kv,
                         key_lengths=c.key_lengths), None

        streams, _ = scan_layers(seg.double, double, streams, seg.double_kv)
    if seg.single is not None:
        if isinstance(streams, tuple):
            img, ctx = streams
            streams = jnp.concatenate([ctx, img], axis=1)

        def single(block, carry, layer_kv):
            return block(carry, c.rope, c.mod_single, ref_kv=layer_kv, key_lengths=c.key_lengths), None

        streams, _ = scan_layers(seg.single, single, streams, seg.single_kv)
    return streams


def _image(streams, n_txt: int):
    return streams[0] if isinstance(streams, tuple) else streams[:, n_txt:]


def _joint(streams):
    return jnp.concatenate([streams[1], streams[0]], axis=1) if isinstance(streams, tuple) else streams


def _num_blocks(model) -> int:
    return model.double_blocks.img_attn.qkv.kernel.shape[0] + model.single_blocks.linear1.kernel.shape[0]


def initial_state(stages: DiTStages, params, cache: StepCache, tokens_shape, txt_len: int, steps: int,
                  dtype) -> StepCacheState:
    """Zero buffers shaped like the signal and the residual of a (W, N', C) token batch."""
    width, n_img = tokens_shape[0], tokens_shape[1]
    model = nnx.merge(stages.graphdef, params)
    hidden = model.img_in.kernel.shape[1]
    residual_len = n_img if cache.back == 0 else n_img + txt_len
    return StepCacheState(
        anchor=jnp.zeros((width, n_img, hidden), jnp.float32),
        residual=jnp.zeros((width, residual_len, hidden), model.dtype),
        accumulated=jnp.float32(0), consecutive=jnp.int32(0),
        distances=jnp.zeros((steps,), jnp.float32), computed=jnp.zeros((steps,), bool))


def cached_forward(stages: DiTStages, cache: StepCache, segs, params, x, rope_img, t, txt, rope_txt, ref_kv,
                   key_lengths, state: StepCacheState, i, steps: int, decided=None):
    """Velocity (W, N', C) float32 and the new state. segs: `segments(...)`, made before the loop.
    decided=None: this call decides step i and updates the state; else a traced bool (skip) from
    the step's first call, and the state is returned unchanged."""
    with attention_path(stages.attention):
        model = nnx.merge(stages.graphdef, params)
        c, (img, ctx) = _head(model, x, rope_img, t, txt, rope_txt, ref_kv, key_lengths)
        front = _run_blocks(c, (img, ctx), segs[0]) if cache.front else (img, ctx)
        if decided is None:
            skip, state = _decide(cache, state, model, c, img, front, i, steps)
        else:
            skip = decided

        def computed(residual):
            middle = _run_blocks(c, front, segs[1])
            if cache.back == 0:
                out = _image(middle, c.n_txt)
                return out, (out - _image(front, c.n_txt)).astype(residual.dtype)
            out = _joint(middle)
            return out, (out - _joint(front)).astype(residual.dtype)

        def reused(residual):
            base = _image(front, c.n_txt) if cache.back == 0 else _joint(front)
            return (base + residual).astype(base.dtype), residual

        out, residual = jax.lax.cond(skip, reused, computed, state.residual)
        if cache.back:
            out = _image(_run_blocks(c, out, segs[2]), c.n_txt)
        velocity = model.final_layer(out, c.vec).astype(jnp.float32)
    if decided is None:
        state = state._replace(residual=residual)
    return velocity, state, skip


def _decide(cache: StepCache, state: StepCacheState, model, c: _Context, img, front, i, steps: int):
    """The skip decision of step i and the state after it (residual excepted)."""
    if cache.kind == "teacache":
        (shift, scale, _), _ = c.mod_img
        signal = modulate(img, shift, scale, model.double_blocks.eps).astype(jnp.float32)
    else:
        signal = (_image(front, c.n_txt) - img).astype(jnp.float32)
    distance = jnp.where(i == 0, jnp.nan, relative_l1(signal, state.anchor))
    in_window = (i >= cache.start) & (i < cache.end) & (i > 0) & (state.consecutive < cache.max_consecutive)
    accumulated = state.accumulated
    if cache.kind == "teacache":
        accumulated = accumulated + jnp.polyval(jnp.asarray(cache.coefficients, jnp.float32), distance)
        skip = in_window & (i < steps - 1) & (accumulated < cache.threshold)
    else:
        if cache.refresh:
            in_window = in_window & ((i - cache.start) % cache.refresh != 0)
        skip = in_window & (distance < cache.threshold)
    if cache.replay is not None:  # a recorded loop's decisions (regen): they depend on its batch mates
        skip = ~jnp.asarray([mark == "1" for mark in cache.replay], bool)[i]
    accumulated = jnp.where(skip, accumulated, 0.0)  # a computed step resets TeaCache's sum
    # TeaCache compares consecutive steps; FB/DB compare with the last computed step
    anchor = signal if cache.kind == "teacache" else jnp.where(skip, state.anchor, signal)
    consecutive = jnp.where(skip, state.consecutive + 1, 0).astype(jnp.int32)
    return skip, state._replace(
        anchor=anchor, accumulated=jnp.float32(accumulated), consecutive=consecutive,
        distances=state.distances.at[i].set(distance), computed=state.computed.at[i].set(~skip))


# ---- the loop -----------------------------------------------------------------------------------


class _StepModel:
    """The transformer for one sampler step: the first call decides and updates the cache state,
    later calls in the step follow that decision (see the module docstring)."""

    def __init__(self, run, state: StepCacheState, i):
        self.run, self.state, self.i = run, state, i
        self.skip = None

    def __call__(self, tokens, times):
        if self.skip is None:
            velocity, self.state, self.skip = self.run(tokens, times, self.state, self.i, None)
            return velocity
        velocity, _, _ = self.run(tokens, times, self.state, self.i, self.skip)
        return velocity


def sample_cached(sampler, model_using: Callable, run, state: StepCacheState, x, sigmas, noise, on_step=None):
    """`denoise.sample` with a step cache: model_using(forward) -> the sampler's model(x, sigma)
    around a transformer forward(tokens, times); run(tokens, times, state, i, decided) is
    `cached_forward` bound to the batch. Returns (x, final cache state)."""

    def body(i, carry):
        x, sampler_state, cache_state = carry
        transformer = _StepModel(run, cache_state, i)
        x, sampler_state = sampler.step(model_using(transformer), i, x, sampler_state, sigmas, noise)
        if on_step is not None:
            on_step(i)
        return x, sampler_state, transformer.state

    x, _, state = jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, (x, sampler.init_state(x), state))
    return x, state
