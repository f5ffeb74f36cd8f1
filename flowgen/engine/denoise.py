"""The denoising loop: every step of one batch in a single jitted program.

Four ways a step can see its references, all in one loop body:

* none            text-to-image: the transformer sees [txt, img];
* cached K/V      KV model: a batch-1 reference pre-pass (run once per reference set, outside)
                  serves every step, step 0 included, and every item of the batch;
* concatenated    plain Klein: reference tokens are appended after the output tokens every step
                  (as `Flux2KleinPipeline`), and their velocities dropped;
* + CFG           base models: the negative prompt is batched with the positive one and
                  `v = u + w·(c − u)`.

Sigmas and model times are device arrays walked by `lax.fori_loop`, so one compiled program
serves every call with the same shapes; a new size, batch, step count or mode compiles once.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.engine.sampler import euler_step

# Incremented while tracing: tests check that repeated calls with the same shapes do not retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()


class Schedule(NamedTuple):
    """Per-step model times t (N,) and the Euler sigmas (N + 1,), both float32 device arrays."""

    times: jax.Array
    sigmas: jax.Array


class Conditioning(NamedTuple):
    """What the transformer sees besides the noisy tokens (None where a mode does not use it)."""

    txt: jax.Array  # (B, T, D) positive prompts; with CFG (2B, T, D): positives then negatives
    rope_txt: tuple  # RoPE tables of the text ids
    rope_img: tuple  # RoPE tables of the output ids (followed by the reference ids when concatenated)
    ref_kv: object = None  # KV model: the cached reference K/V (batch 1)
    ref_tokens: jax.Array | None = None  # plain Klein: (1, R, C) reference tokens to append


@functools.partial(jax.jit, static_argnames=("forward", "cfg"))
def _loop(params, x, cond: Conditioning, schedule: Schedule, guidance, *, forward, cfg: bool):
    TRACE_COUNTS["denoise"] += 1
    batch, n = x.shape[0], x.shape[1]
    width = 2 * batch if cfg else batch

    def velocity(x, t):
        tokens = jnp.concatenate([x, x], axis=0) if cfg else x
        if cond.ref_tokens is not None:
            refs = jnp.broadcast_to(cond.ref_tokens.astype(tokens.dtype), (width, *cond.ref_tokens.shape[1:]))
            tokens = jnp.concatenate([tokens, refs], axis=1)
        times = jnp.broadcast_to(t, (width,))
        v = forward(params, tokens, cond.rope_img, times, cond.txt, cond.rope_txt, cond.ref_kv)[:, :n]
        if cfg:
            cond_v, uncond_v = v[:batch], v[batch:]
            v = uncond_v + guidance * (cond_v - uncond_v)
        return v

    def step(i, x):
        v = velocity(x, schedule.times[i])
        return euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])

    return jax.lax.fori_loop(0, schedule.times.shape[0], step, x)


class Denoiser:
    """Runs the whole sampling loop for a transformer's jitted pure forward.

    `forward(params, x, rope_img, t, txt, rope_txt, ref_kv)` is `Transformer.forward_fn`.
    """

    def __init__(self, forward):
        # `forward` is a static argument of one module-level jit: pipelines sharing a transformer
        # share compiled loops.
        self.forward = forward

    def __call__(self, params, x: jax.Array, cond: Conditioning, schedule: Schedule,
                 guidance: float | None = None) -> jax.Array:
        """Denoise tokens x (B, N, C) from sigma 1 to 0; returns the final tokens in x's dtype."""
        cfg = guidance is not None
        g = jnp.float32(guidance if cfg else 1.0)
        return _loop(params, x, cond, schedule, g, forward=self.forward, cfg=cfg)


def make_schedule(sigmas: np.ndarray, times: np.ndarray) -> Schedule:
    """Device arrays for `sampler.sigmas()` / `sampler.model_timesteps()` output."""
    return Schedule(jnp.asarray(times, jnp.float32), jnp.asarray(sigmas, jnp.float32))
