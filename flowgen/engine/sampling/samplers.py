"""Single-step samplers (no history between steps) for a flow model, run as ComfyUI runs k-diffusion on one.

The flow model gives a velocity v at noise level σ; its denoised estimate is x0 = x − σ·v, and the
probability-flow ODE is dx/dσ = (x − x0)/σ = v. k-diffusion's samplers are written for that ODE, so
the deterministic ones apply unchanged (their derivative d = (x − denoised)/σ is v). Their
stochastic steps assume x = x0 + σ·ε (variance exploding) and would re-noise a flow sample without
shrinking its signal, so the stochastic samplers here use the rectified-flow forms ComfyUI switches to
for flow ("CONST") models: `sample_euler_ancestral_RF`, `sample_dpm_2_ancestral_RF`, and
`sample_dpmpp_sde` in half-log-SNR λ = log((1 − σ)/σ), with α = 1 − σ.

Stochastic samplers draw noise only through the loop's `noise(i, k)` (per row, from each row's seed).
Every sampler computes in float32 and returns x in its dtype; a second model call in a step is
skipped (`lax.cond`) on the last step, where the samplers take a plain Euler / denoising step.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from flowgen.engine.sampling.base import Sampler

F32 = jnp.float32


def velocity(model, x, sigma):
    """The model's velocity at x (fed in x's dtype) as float32."""
    return model(x, sigma).astype(F32)


def cap_one(sigma, value: float):
    """sigma, or `value` (just below 1) where sigma >= 1: log-SNR samplers need α = 1 − σ > 0.

    Like ComfyUI's `offset_first_sigma_for_snr` the substitute is also the level the model is asked
    about; it only ever changes the first step of a schedule that starts at 1."""
    return jnp.where(sigma >= 1, jnp.asarray(value, F32), sigma)


def half_log_snr(sigma):
    """λ = log(α/σ) of a flow noise level, α = 1 − σ."""
    return jnp.log1p(-sigma) - jnp.log(sigma)


def ancestral_step(sigma_from, sigma_to, eta: float):
    """k-diffusion's `get_ancestral_step` (in VE sigmas): (sigma_down, sigma_up)."""
    if not eta:
        return sigma_to, jnp.zeros_like(sigma_to)
    sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return jnp.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def rf_renoise(sigma, sigma_next, eta: float):
    """ComfyUI's RF ancestral split: (sigma_down, alpha_next / alpha_down, renoise coefficient)."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2, 0.0))
    return sigma_down, alpha_next / alpha_down, renoise


@dataclass(frozen=True)
class Heun(Sampler):
    """k-diffusion `sample_heun` (Karras et al. 2022, Alg. 2, no churn); = diffusers' FlowMatchHeun."""

    def step(self, model, i, x, state, sigmas, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        xf, v = x.astype(F32), velocity(model, x, sigma)
        dt = sigma_next - sigma
        x_euler = xf + dt * v

        def heun(_):
            v2 = velocity(model, x_euler.astype(x.dtype), sigma_next)
            return xf + dt * ((v + v2) / 2)

        out = jax.lax.cond(sigma_next == 0, lambda _: x_euler, heun, None)
        return out.astype(x.dtype), state


@dataclass(frozen=True)
class DPM2(Sampler):
    """k-diffusion `sample_dpm_2`: a midpoint step at the geometric mean σ_mid = √(σ·σ_next)."""

    def step(self, model, i, x, state, sigmas, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        xf, v = x.astype(F32), velocity(model, x, sigma)

        def dpm2(_):
            log_s = jnp.log(sigma)
            sigma_mid = jnp.exp(log_s + 0.5 * (jnp.log(sigma_next) - log_s))
            x2 = xf + v * (sigma_mid - sigma)
            v2 = velocity(model, x2.astype(x.dtype), sigma_mid)
            return xf + v2 * (sigma_next - sigma)

        out = jax.lax.cond(sigma_next == 0, lambda _: xf + v * (sigma_next - sigma), dpm2, None)
        return out.astype(x.dtype), state


@dataclass(frozen=True)
class EulerAncestralRF(Sampler):
    """ComfyUI `sample_euler_ancestral_RF`: Euler down to σ_down = σ_next·(1 + (σ_next/σ − 1)·η), then
    scale the signal to α_next and add fresh noise so the total noise is σ_next again."""

    eta: float = 1.0
    stochastic = True

    def step(self, model, i, x, state, sigmas, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        xf, v = x.astype(F32), velocity(model, x, sigma)
        denoised = xf - sigma * v
        sigma_down, scale, renoise = rf_renoise(sigma, sigma_next, self.eta)
        ratio = sigma_down / sigma
        stepped = ratio * xf + (1 - ratio) * denoised
        if self.eta > 0:
            stepped = scale * stepped + noise(i) * renoise
        return jnp.where(sigma_next == 0, denoised, stepped).astype(x.dtype), state


@dataclass(frozen=True)
class DPM2AncestralRF(Sampler):
    """ComfyUI `sample_dpm_2_ancestral_RF`: a DPM-2 step down to σ_down, then the RF re-noise."""

    eta: float = 1.0
    stochastic = True

    def step(self, model, i, x, state, sigmas, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        xf, v = x.astype(F32), velocity(model, x, sigma)
        sigma_down, scale, renoise = rf_renoise(sigma, sigma_next, self.eta)

        def dpm2(_):
            log_s = jnp.log(sigma)
            sigma_mid = jnp.exp(log_s + 0.5 * (jnp.log(sigma_down) - log_s))
            x2 = xf + v * (sigma_mid - sigma)
            v2 = velocity(model, x2.astype(x.dtype), sigma_mid)
            return scale * (xf + v2 * (sigma_down - sigma)) + noise(i) * renoise

        out = jax.lax.cond(sigma_down == 0, lambda _: xf + v * (sigma_down - sigma), dpm2, None)
        return out.astype(x.dtype), state


@dataclass(frozen=True)
class DPMPPSDE(Sampler):
    """ComfyUI `sample_dpmpp_sde` for flow models (DPM-Solver++ stochastic, two stages at r = 1/2).

    Its two draws per step are increments of one Brownian path over [σ_s, σ] and [σ_next, σ] (ComfyUI's
    BrownianTreeNoiseSampler, in σ): the second is built from the first and a fresh draw with the
    Brownian correlation √((σ − σ_s)/(σ − σ_next)), so the law is the tree's.
    """

    eta: float = 1.0
    r: float = 0.5
    sigma_one: float = 1 - 1e-4
    stochastic = True

    def step(self, model, i, x, state, sigmas, noise):
        sigma, sigma_next = cap_one(sigmas[i], self.sigma_one), sigmas[i + 1]
        xf = x.astype(F32)
        denoised = xf - sigma * velocity(model, x, sigma)

        def sde(_):
            lam_s, lam_t = half_log_snr(sigma), half_log_snr(sigma_next)
            h = lam_t - lam_s
            lam_s1 = lam_s + self.r * h
            fac = 1 / (2 * self.r)
            sigma_s1 = jax.nn.sigmoid(-lam_s1)
            alpha_s, alpha_s1, alpha_t = 1 - sigma, 1 - sigma_s1, 1 - sigma_next
            z0, z1 = noise(i, 0), noise(i, 1)
            rho = (sigma - sigma_s1) / (sigma - sigma_next)
            n1, n2 = z0, jnp.sqrt(rho) * z0 + jnp.sqrt(1 - rho) * z1

            sd, su = ancestral_step(jnp.exp(-lam_s), jnp.exp(-lam_s1), self.eta)
            h_ = -jnp.log(sd) - lam_s
            x2 = (alpha_s1 / alpha_s) * jnp.exp(-h_) * xf - alpha_s1 * jnp.expm1(-h_) * denoised
            if self.eta > 0:
                x2 = x2 + alpha_s1 * n1 * su
            denoised_2 = x2 - sigma_s1 * velocity(model, x2.astype(x.dtype), sigma_s1)

            sd, su = ancestral_step(jnp.exp(-lam_s), jnp.exp(-lam_t), self.eta)
            h_ = -jnp.log(sd) - lam_s
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            out = (alpha_t / alpha_s) * jnp.exp(-h_) * xf - alpha_t * jnp.expm1(-h_) * denoised_d
            if self.eta > 0:
                out = out + alpha_t * n2 * su
            return out

        out = jax.lax.cond(sigma_next == 0, lambda _: denoised, sde, None)
        return out.astype(x.dtype), state


@dataclass(frozen=True)
class FlowTCD(Sampler):
    """Consistency sampling (TCD, LCM = gamma 1) on a flow model.

    Predict x0, step deterministically (DDIM, i.e. Euler) down to σ_s = (1 − γ)·σ_next, then noise
    forward to σ_next: x = (α_next/α_s)·x_s + √(σ_next² − (α_next·σ_s/α_s)²)·z. γ = 1 is diffusers'
    FlowMatchLCMScheduler exactly (x = (1 − σ_next)·x0 + σ_next·z); γ = 0.3 is TCDScheduler's default.
    """

    gamma: float = 1.0
    stochastic = True

    def step(self, model, i, x, state, sigmas, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        xf, v = x.astype(F32), velocity(model, x, sigma)
        denoised = xf - sigma * v
        if self.gamma == 1:
            out = (1 - sigma_next) * denoised + sigma_next * noise(i)
        else:
            sigma_s = (1 - self.gamma) * sigma_next
            eps = xf + (1 - sigma) * v
            x_s = (1 - sigma_s) * denoised + sigma_s * eps
            alpha_t, alpha_s = 1 - sigma_next, 1 - sigma_s
            kept = (1 - self.gamma) * alpha_t / alpha_s  # the share of σ' the DDIM step leaves
            renoise = sigma_next * jnp.sqrt(jnp.maximum(1 - kept**2, 0.0))
            out = (alpha_t / alpha_s) * x_s + renoise * noise(i)
        return jnp.where(sigma_next == 0, denoised, out).astype(x.dtype), state
