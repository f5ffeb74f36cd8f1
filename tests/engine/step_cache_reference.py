"""Plain-Python references of the three step caches, and a host-driven loop that uses them.

`decisions(cache, distances)` replays an algorithm's skip rule on a recorded distance sequence,
written from the algorithms' descriptions (TeaCache4FLUX, ParaAttention's first-block cache,
cache-dit's DBCache; shared/reference/jax_engine.md §3), not from the engine's jnp code.

`host_loop(...)` is the "two executables" form of the same cache: the DiT stages are separately
jitted programs and the decision is taken on the host from the distance each step reports. The
tests compare it with the compiled `lax.cond` loop; bench/step_caches.py times the two.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgen.engine.sampling import step_cache as sc
from flowgen.engine.sampling.loop import model_time
from flowgen.engine.sampling.step_cache_settings import StepCache
from flowgen.engine.transformer import model as transformer
from flowgen.engine.transformer.attention import attention_path
from flowgen.engine.transformer.blocks import modulate


class Reference:
    """One algorithm's state machine; `decide(i, distance)` -> True to skip step i."""

    def __init__(self, cache: StepCache, steps: int):
        self.cache, self.steps = cache, steps
        self.accumulated = 0.0  # TeaCache
        self.consecutive = 0  # cached steps since the last computed one

    def _limits_allow(self, i: int) -> bool:
        c = self.cache
        if i == 0 or not c.start <= i < c.end:  # nothing cached yet / outside the window
            return False
        if self.consecutive >= c.max_consecutive:
            return False
        if c.kind == "teacache" and i == self.steps - 1:  # TeaCache: the last step is always computed
            return False
        if c.kind == "dbcache" and c.refresh and (i - c.start) % c.refresh == 0:  # periodic refresh
            return False
        return True

    def decide(self, i: int, distance: float) -> bool:
        c = self.cache
        if c.kind == "teacache":
            # acc += poly(rel_l1); skip while acc < threshold; a computed step resets acc
            rescaled = float(np.poly1d(c.coefficients)(distance)) if not math.isnan(distance) else math.nan
            candidate = self.accumulated + rescaled
            skip = self._limits_allow(i) and candidate < c.threshold
            self.accumulated = candidate if skip else 0.0
        else:
            # first-block / dual-block cache: skip iff the front residual moved less than the threshold
            skip = self._limits_allow(i) and distance < c.threshold
        self.consecutive = self.consecutive + 1 if skip else 0
        return skip


def decisions(cache: StepCache, distances) -> list[bool]:
    """computed[i] for every step (True: the middle blocks ran)."""
    ref = Reference(cache, len(distances))
    return [not ref.decide(i, float(d)) for i, d in enumerate(distances)]


def rel_l1(a, b) -> float:
    """max over rows of mean|a − b| / mean|b| (float64 on the host)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    axes = tuple(range(1, a.ndim))
    return float(np.max(np.abs(a - b).mean(axis=axes) / np.abs(b).mean(axis=axes)))


# ---- the host-driven form: three jitted stages, decisions on the host ---------------------------


def _stages(stages: transformer.TransformerStages, cache: StepCache):
    """Three jitted programs over the DiT's stages: front (and the signal), middle, back + final."""

    def embedded(params, x, rope_img, t, txt, rope_txt):
        model = nnx.merge(stages.graphdef, params)
        inputs, streams = transformer.embed(model, x, rope_img, t, txt, rope_txt)
        return model, inputs, streams, sc.block_ranges(stages, params, cache, None)

    def tokens(streams, n_txt):  # what the middle adds to (as the engine: image, or joint with back blocks)
        return transformer.image_tokens(streams, n_txt) if cache.back == 0 else transformer.joint_tokens(streams)

    @jax.jit
    def front(params, x, rope_img, t, txt, rope_txt):
        with attention_path(stages.attention):
            model, inputs, streams, ranges = embedded(params, x, rope_img, t, txt, rope_txt)
            out = transformer.run_blocks(inputs, streams, ranges.front)
            img = streams[0]
            if cache.kind == "teacache":
                (shift, scale, _), _ = inputs.mod_img
                signal = modulate(img, shift, scale, model.double_blocks.eps).astype(jnp.float32)
            else:
                signal = (transformer.image_tokens(out, inputs.n_txt) - img).astype(jnp.float32)
            return out, tokens(out, inputs.n_txt), signal

    @jax.jit
    def middle(params, x, rope_img, t, txt, rope_txt, out):
        with attention_path(stages.attention):
            _, inputs, _, ranges = embedded(params, x, rope_img, t, txt, rope_txt)
            return tokens(transformer.run_blocks(inputs, out, ranges.middle), inputs.n_txt)

    @jax.jit
    def back(params, x, rope_img, t, txt, rope_txt, base):
        with attention_path(stages.attention):
            model, inputs, _, ranges = embedded(params, x, rope_img, t, txt, rope_txt)
            if cache.back:
                base = transformer.image_tokens(transformer.run_blocks(inputs, base, ranges.back), inputs.n_txt)
            return transformer.velocity(model, inputs, base)

    return front, middle, back


def host_loop(stages: transformer.TransformerStages, params, cache: StepCache, x, sigmas, txt, rope_img, rope_txt):
    """Flow-Euler sampling (no CFG, no references) with the cache decided on the host by `Reference`.
    Returns (x, computed, distances)."""
    front, middle, back = _stages(stages, cache)
    sigmas = np.asarray(sigmas, np.float32)
    steps = len(sigmas) - 1
    ref = Reference(cache, steps)
    anchor = residual = None
    computed, distances = [], []
    for i in range(steps):
        t = jnp.broadcast_to(model_time(sigmas[i]), (x.shape[0],))
        out, base, signal = front(params, x, rope_img, t, txt, rope_txt)
        distance = math.nan if i == 0 else rel_l1(signal, anchor)
        skip = ref.decide(i, distance)
        if cache.kind == "teacache" or not skip:
            anchor = signal  # TeaCache: every step; FB/DB: computed steps only
        if skip:
            base = (base + residual).astype(base.dtype)
        else:
            full = middle(params, x, rope_img, t, txt, rope_txt, out)
            residual, base = (full - base), full
        v = back(params, x, rope_img, t, txt, rope_txt, base)
        x = (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v).astype(x.dtype)
        computed.append(not skip)
        distances.append(distance)
    return jax.block_until_ready(x), computed, distances
