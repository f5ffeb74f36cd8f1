"""Step caches inside the compiled sampling loop (TeaCache, FBCache, DBCache; settings in
`step_cache_settings`).

A cached step is the transformer's `forward` (transformer/model.py) built from the same stages (`embed`,
`run_blocks`, `velocity`), with the block stack split into three `block_range`s:

    embed + front blocks  (always)  -> the signal, and the decision (one scalar for the batch)
    middle blocks         (lax.cond: run and store their residual, or add the stored residual)
    back blocks + final   (always)

The cache state (anchor, residual, accumulator, consecutive count, and a per-step record of the
distance and decision) rides in the `fori_loop` carry. One decision per sampler step, made at the
step's first model call; a sampler's further calls in that step (Heun, DPM2, SDE stages) follow
it without touching the state: on a skipped step they reuse the residual too. Multistep samplers
get the cached velocity as the model output, like any other.

Distances are relative L1, mean|a − b| / mean|b| per row in float32, then the max over the rows
(CFG halves included): a batch computes a step whenever any of its rows would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flowgen.engine.runtime import placement
from flowgen.engine.sampling.step_cache_settings import StepCache
from flowgen.engine.transformer import model as transformer
from flowgen.engine.transformer.attention import attention_path
from flowgen.engine.transformer.model import TransformerStages


class StepCacheState(NamedTuple):
    anchor: jax.Array  # teacache: last step's modulated input; fb/db: front residual of the last computed step
    residual: jax.Array  # what the middle blocks added on the last computed step
    accumulated: jax.Array  # teacache's rescaled distance summed since the last computed step
    consecutive: jax.Array  # cached steps since the last computed step
    distances: jax.Array  # (steps,) the raw distance of every step (NaN at step 0)
    computed: jax.Array  # (steps,) bool: the step ran its middle blocks


def relative_l1(a: jax.Array, b: jax.Array) -> jax.Array:
    """max over rows of mean|a − b| / mean|b|, in float32 (a, b: (B, ...))."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    axes = tuple(range(1, a.ndim))
    num = jnp.mean(jnp.abs(a - b), axis=axes)
    den = jnp.mean(jnp.abs(b), axis=axes)
    # the batch's rows may be split over devices (a mesh's "data" axis): the max over all of them
    return placement.batch_max(jnp.max(num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)))


# ---- the cached step, from the transformer's stages (transformer/model.py) ----------------------


class CacheRanges(NamedTuple):
    """A cache's split of the block stack (`transformer.BlockRange`s with their reference K/V)."""

    front: transformer.BlockRange  # always run; its residual is FB/DB's signal (empty for TeaCache)
    middle: transformer.BlockRange  # run, or replaced by the residual it added on the last computed step
    back: transformer.BlockRange  # always run, on the computed or reused middle (DBCache; else empty)


def block_ranges(stages: TransformerStages, params, cache: StepCache, ref_kv) -> CacheRanges:
    """The cache's three ranges, sliced once before the loop: slicing inside a step would copy the
    weights every step."""
    model = nnx.merge(stages.graphdef, params)
    total = sum(transformer.num_blocks(model))
    bounds = (0, cache.front, total - cache.back, total)
    return CacheRanges(*(transformer.block_range(model, ref_kv, a, b) for a, b in itertools.pairwise(bounds)))


def initial_state(
    stages: TransformerStages, params, cache: StepCache, tokens_shape, txt_len: int, steps: int, dtype
) -> StepCacheState:
    """Zero buffers shaped like the signal and the residual of a (W, N', C) token batch."""
    width, n_img = tokens_shape[0], tokens_shape[1]
    model = nnx.merge(stages.graphdef, params)
    hidden = model.img_in.kernel.shape[1]
    residual_len = n_img if cache.back == 0 else n_img + txt_len
    return StepCacheState(
        anchor=jnp.zeros((width, n_img, hidden), jnp.float32),
        residual=jnp.zeros((width, residual_len, hidden), model.dtype),
        accumulated=jnp.float32(0),
        consecutive=jnp.int32(0),
        distances=jnp.zeros((steps,), jnp.float32),
        computed=jnp.zeros((steps,), bool),
    )


def cached_forward(
    stages: TransformerStages,
    cache: StepCache,
    ranges: CacheRanges,
    params,
    x,
    rope_img,
    t,
    txt,
    rope_txt,
    key_lengths,
    state: StepCacheState,
    i,
    steps: int,
    decided=None,
):
    """`transformer.forward` with the middle range cached: velocity (W, N', C) float32, the new state and
    the skip decision. ranges: `block_ranges(...)` (they carry the reference K/V), made before the
    loop. decided=None: this call decides step i and updates the state; else a traced bool (skip)
    from the step's first call, and the state is returned unchanged."""
    with attention_path(stages.attention), placement.gathering(stages.gather):
        model = nnx.merge(stages.graphdef, params)
        inputs, streams = transformer.embed(model, x, rope_img, t, txt, rope_txt, key_lengths)
        front = transformer.run_blocks(inputs, streams, ranges.front)
        if decided is None:
            skip, state = _decide(cache, state, model, inputs, streams, front, i, steps)
        else:
            skip = decided

        def tokens(streams):  # what the middle adds to: the image stream, or the joint one if back blocks follow
            return transformer.joint_tokens(streams) if cache.back else transformer.image_tokens(streams, inputs.n_txt)

        def computed(residual):
            if cache.back:
                out = tokens(transformer.run_blocks(inputs, front, ranges.middle))
            else:  # the middle ends the stack: as `transformer.forward` runs it
                out = transformer.image_after(inputs, front, ranges.middle)
            return out, (out - tokens(front)).astype(residual.dtype)

        def reused(residual):
            base = tokens(front)
            return (base + residual).astype(base.dtype), residual

        out, residual = jax.lax.cond(skip, reused, computed, state.residual)
        if cache.back:
            out = transformer.image_after(inputs, out, ranges.back)
        velocity = transformer.velocity(model, inputs, out)
    if decided is None:
        state = state._replace(residual=residual)
    return velocity, state, skip


def _decide(
    cache: StepCache, state: StepCacheState, model, inputs: transformer.StepInputs, streams, front, i, steps: int
):
    """The skip decision of step i and the state after it (residual excepted)."""
    img = transformer.image_tokens(streams, inputs.n_txt)
    if cache.kind == "teacache":  # block 0's modulated image input
        signal = model.double_blocks.attention_input(img, inputs.mod_img).astype(jnp.float32)
    else:  # the front blocks' residual on the image stream
        signal = (transformer.image_tokens(front, inputs.n_txt) - img).astype(jnp.float32)
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
        anchor=anchor,
        accumulated=jnp.float32(accumulated),
        consecutive=consecutive,
        distances=state.distances.at[i].set(distance),
        computed=state.computed.at[i].set(~skip),
    )


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


def sample_cached(sampler, model_using: Callable, run, carry, sigmas, noise, start, stop):
    """`loop.sample` with a step cache, over steps [start, stop): model_using(forward) -> the
    sampler's model(x, sigma) around a transformer forward(tokens, times); run(tokens, times,
    state, i, decided) is `cached_forward` bound to the batch. carry: (x, sampler state, cache
    state); returns it after step stop - 1."""

    def body(i, carry):
        x, sampler_state, cache_state = carry
        step_model = _StepModel(run, cache_state, i)
        x, sampler_state = sampler.step(model_using(step_model), i, x, sampler_state, sigmas, noise)
        return x, sampler_state, step_model.state

    return jax.lax.fori_loop(start, stop, body, carry)
