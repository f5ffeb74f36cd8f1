"""What a sampler is to the compiled denoising loop.

A sampler is a frozen dataclass (hashable, so it is a static argument of the loop's jit: each
sampler compiles its own loop, configurations that compare equal share one). The loop calls

    state = sampler.init_state(x)                         # once, before step 0 (a pytree)
    x, state = sampler.step(model, i, x, state, sigmas, noise)   # for i in 0..N-1

* `model(x, sigma) -> v`: the flow velocity (B, N, C) float32 at noise level `sigma` (a float32
  scalar, traced); CFG is already applied. x0 = x − σ·v and the ODE derivative dx/dσ = v.
  A sampler may call it more than once per step (Heun, DPM2, ...).
* `i`: the traced step index; `sigmas`: the (N + 1,) float32 device array, sigmas[N] = 0.
* `noise(i, k=0) -> (B, N, C)` float32 standard normal, drawn per row from that row's seed (so an
  image never depends on its batch mates and regen replays it bit for bit); `k` tells apart several
  draws within one step. Deterministic samplers never call it.

Samplers work on x in float32 and return it in x's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Model = Callable[[jax.Array, jax.Array], jax.Array]
Noise = Callable[..., jax.Array]


@dataclass(frozen=True)
class Sampler:
    """Base class; subclasses override `step` (and `init_state` when they keep history)."""

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws noise (ancestral / SDE / consistency samplers); subclasses that
        always do set `stochastic = True`, those that depend on a setting override the property."""
        return False

    def init_state(self, x: jax.Array) -> Any:
        return ()

    def step(self, model: Model, i, x: jax.Array, state, sigmas: jax.Array, noise: Noise):
        raise NotImplementedError


@dataclass(frozen=True)
class FlowEuler(Sampler):
    """Klein's own update x + (σ_next − σ)·v, in float32 (bit-identical to diffusers' scheduler)."""

    def step(self, model, i, x, state, sigmas, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = model(x, sigma)
        return euler_step(x, v, sigma, sigma_next), state


def euler_step(x, v, sigma, sigma_next):
    """One Euler step x + (sigma_next - sigma) * v, in float32, returned in x's dtype.

    Works on numpy or JAX arrays and inside `jax.jit` (sigma, sigma_next may be traced scalars).
    Like diffusers' scheduler, the sample is upcast to float32 for the update and cast back.
    (In bf16 mode diffusers rounds dt * v to bf16 before adding it; we keep the product in
    float32, which is more accurate.)
    """
    dtype = x.dtype
    dt = (sigma_next - sigma).astype(jnp.float32) if hasattr(sigma, "astype") else jnp.float32(sigma_next - sigma)
    return (x.astype(jnp.float32) + dt * v.astype(jnp.float32)).astype(dtype)
