"""Multistep samplers: each keeps a fixed-shape history (arrays, most recent first) in the loop's state.

The loop's step index i is traced, so warm-up (lower orders while history fills) and the final step
are chosen with `jnp.where` on i; the step count N = len(sigmas) − 1 is static (a shape), so tables
that depend on N only (DPM-Solver singlestep's order list) are built in Python. Unused branches may
hold inf/NaN (e.g. a log of the terminal 0); `jnp.where` discards them, nothing multiplies them away.

Two families:

* k-diffusion / ComfyUI formulas on the flow model wrapped as a denoiser (x0 = x − σ·v): LMS,
  iPNDM, DPM-Solver++ 2M / 3M (`DPMSolverPP(flow=False)`: k-diffusion's variance-exploding form, in
  λ = −log σ), and the flow-aware DPM-Solver++ SDEs (`DPMSolverPP(flow=True)`: ComfyUI's half-log-SNR
  form λ = log((1 − σ)/σ), α = 1 − σ, which is also diffusers' `use_flow_sigmas` form).
* diffusers' flow variants (`use_flow_sigmas=True, prediction_type="flow_prediction"`):
  DPMSolverMultistep (= `DPMSolverPP(order=2, flow=True)`), DPMSolverSinglestep, DEISMultistep,
  UniPCMultistep. Like every sampler here they end on a terminal σ = 0 with x = x0.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from flowgen.engine.sampling.base import Sampler
from flowgen.engine.sampling.samplers import F32, cap_one, half_log_snr, velocity


def _push(history, item):
    """history (K, ...) most recent first -> item, then the K − 1 most recent."""
    return jnp.concatenate([item[None].astype(history.dtype), history[:-1]], axis=0)


def _at(sigmas, index):
    """sigmas[index] with index clamped at 0 (history slots before the first step)."""
    return sigmas[jnp.maximum(index, 0)]


def _select(order, branches):
    """branches[k] is the result for order k + 1; pick the one for the traced `order`."""
    out = branches[-1]
    for k in range(len(branches) - 2, -1, -1):
        out = jnp.where(order == k + 1, branches[k], out)
    return out


# ---- k-diffusion / ComfyUI ---------------------------------------------------------------------

_GL_X, _GL_W = np.polynomial.legendre.leggauss(4)  # exact for the ≤ cubic Lagrange polynomials


@dataclass(frozen=True)
class LMS(Sampler):
    """k-diffusion `sample_lms` (order 4): Adams–Bashforth in σ on variable steps, the weights the
    exact integrals of the Lagrange basis over [σ_i, σ_i+1]; the last step is ComfyUI's denoise
    (x = x0, which is the Euler step to 0)."""

    order: int = 4

    def init_state(self, x):
        return jnp.zeros((self.order - 1, *x.shape), F32)

    def step(self, model, i, x, state, sigmas, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        xf, v = x.astype(F32), velocity(model, x, sigma)
        cur = jnp.minimum(i + 1, self.order)
        nodes = [_at(sigmas, i - k) for k in range(self.order)]
        half, mid = (sigma_next - sigma) / 2, (sigma_next + sigma) / 2
        taus = mid + half * jnp.asarray(_GL_X, F32)
        weights = half * jnp.asarray(_GL_W, F32)
        ds = [v] + [state[k] for k in range(self.order - 1)]
        out = xf
        for j in range(self.order):
            basis = jnp.ones_like(taus)
            for k in range(self.order):
                if k == j:
                    continue
                used = k < cur
                denom = jnp.where(used, nodes[j] - nodes[k], 1.0)
                basis = basis * jnp.where(used, (taus - nodes[k]) / denom, 1.0)
            coeff = jnp.where(j < cur, jnp.sum(weights * basis), 0.0)
            out = out + coeff * ds[j]
        out = jnp.where(sigma_next == 0, xf - sigma * v, out)
        return out.astype(x.dtype), _push(state, v)


_IPNDM = np.array(
    [[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0], [55 / 24, -59 / 24, 37 / 24, -9 / 24]],
    np.float32,
)


@dataclass(frozen=True)
class IPNDM(Sampler):
    """ComfyUI `sample_ipndm` (max order 4): Adams–Bashforth with the fixed uniform-step weights
    (1; 3/2, −1/2; 23/12, −16/12, 5/12; 55/24, −59/24, 37/24, −9/24), lower orders while the history
    fills; the last step denoises."""

    def init_state(self, x):
        return jnp.zeros((3, *x.shape), F32)

    def step(self, model, i, x, state, sigmas, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        xf, v = x.astype(F32), velocity(model, x, sigma)
        coeffs = jnp.asarray(_IPNDM)[jnp.minimum(i, 3)]
        slope = coeffs[0] * v + coeffs[1] * state[0] + coeffs[2] * state[1] + coeffs[3] * state[2]
        out = jnp.where(sigma_next == 0, xf - sigma * v, xf + (sigma_next - sigma) * slope)
        return out.astype(x.dtype), _push(state, v)


@dataclass(frozen=True)
class DPMSolverPP(Sampler):
    """DPM-Solver++ multistep on data predictions, orders 1–3, with η-scaled SDE noise.

    x' = (σ'/σ)·e^(−ηh)·x + α'·(1 − e^(−(1+η)h))·x0 + corrections + σ'·√(1 − e^(−2ηh))·z, h = λ' − λ.

    flow=False: λ = −log σ, α = 1: k-diffusion's `sample_dpmpp_2m` (order 2, midpoint correction) and
    `sample_dpmpp_3m_sde` (order 3, its φ₂/φ₃ corrections), applied to the flow denoiser as ComfyUI
    applies `dpmpp_2m`. flow=True: λ = log((1 − σ)/σ), α = 1 − σ, ComfyUI's forms for flow models
    (`dpmpp_2m_sde`, `dpmpp_3m_sde`) and diffusers' DPMSolverMultistep with `use_flow_sigmas`
    (order 2, midpoint, η = 0; η = 1, order 1 is `sde-dpmsolver++` first order, i.e. DDPM's posterior).
    A first σ of 1 (infinite −λ) is replaced by `sigma_one`. The last step (σ' = 0) returns x0.
    """

    order: int = 2
    eta: float = 0.0
    flow: bool = False
    sigma_one: float = 1 - 1e-4

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def _lam(self, sigma):
        return half_log_snr(sigma) if self.flow else -jnp.log(sigma)

    def init_state(self, x):
        k = max(self.order - 1, 1)
        return jnp.zeros((k, *x.shape), F32), jnp.zeros((k,), F32)

    def step(self, model, i, x, state, sigmas, noise):
        past, past_h = state
        sigma = cap_one(sigmas[i], self.sigma_one) if self.flow else sigmas[i]
        sigma_next = sigmas[i + 1]
        xf = x.astype(F32)
        denoised = xf - sigma * velocity(model, x, sigma)
        last = sigma_next == 0
        s_next = jnp.where(last, sigma * 0.5, sigma_next)  # any positive level: the branch is discarded
        h = self._lam(s_next) - self._lam(sigma)
        h_eta = h * (1 + self.eta)
        alpha_t = 1 - s_next if self.flow else 1.0
        one_minus = -jnp.expm1(-h_eta)
        out = (s_next / sigma) * jnp.exp(-self.eta * h) * xf + alpha_t * one_minus * denoised
        if self.order == 2:
            r = past_h[0] / h
            correction = 0.5 * alpha_t * one_minus * (1 / r) * (denoised - past[0])
            out = jnp.where(i >= 1, out + correction, out)
        elif self.order == 3:
            phi_2 = jnp.expm1(-h_eta) / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            r = past_h[0] / h
            second = out + alpha_t * phi_2 * ((denoised - past[0]) / r)
            r0, r1 = past_h[0] / h, past_h[1] / h
            d1_0 = (denoised - past[0]) / r0
            d1_1 = (past[0] - past[1]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            third = out + alpha_t * phi_2 * d1 - alpha_t * phi_3 * d2
            out = jnp.where(i >= 2, third, jnp.where(i >= 1, second, out))
        if self.eta > 0:
            out = out + noise(i) * s_next * jnp.sqrt(-jnp.expm1(-2 * self.eta * h))
        out = jnp.where(last, denoised, out)
        new_state = (_push(past, denoised), _push(past_h, h)) if self.order > 1 else state
        return out.astype(x.dtype), new_state


# ---- diffusers' flow variants --------------------------------------------------------------------


def _flow_alpha_lambda(sigma):
    return 1 - sigma, half_log_snr(sigma)


def _singlestep_orders(steps: int) -> list[int]:
    """diffusers DPMSolverSinglestep `get_order_list` for solver_order=2, lower_order_final=True."""
    orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    orders[-1] = 1  # final_sigmas_type="zero"
    return orders


@dataclass(frozen=True)
class DPMSolverSinglestep(Sampler):
    """diffusers DPMSolverSinglestepScheduler (dpmsolver++, order 2, midpoint) with flow sigmas: steps
    alternate a first-order step (from x_a) and a second-order step from that same x_a using both
    model outputs."""

    sigma_one: float = 1 - 1e-4

    def init_state(self, x):
        return jnp.zeros(x.shape, F32), jnp.zeros(x.shape, F32)  # x at the block start, previous x0

    def step(self, model, i, x, state, sigmas, noise):
        x_start, m_prev = state
        steps = sigmas.shape[0] - 1
        order = jnp.asarray(_singlestep_orders(steps), jnp.int32)[i]
        sigma, sigma_next = cap_one(sigmas[i], self.sigma_one), sigmas[i + 1]
        sigma_prev = cap_one(_at(sigmas, i - 1), self.sigma_one)
        xf = x.astype(F32)
        m = xf - sigma * velocity(model, x, sigma)
        last = sigma_next == 0
        s_next = jnp.where(last, sigma * 0.5, sigma_next)
        alpha_t, lam_t = _flow_alpha_lambda(s_next)
        lam_s, lam_p = half_log_snr(sigma), half_log_snr(sigma_prev)
        h = lam_t - lam_s
        first = (s_next / sigma) * xf - alpha_t * jnp.expm1(-h) * m
        h2, h0 = lam_t - lam_p, lam_s - lam_p
        d1 = (1 / (h0 / h2)) * (m - m_prev)
        second = (
            (s_next / sigma_prev) * x_start - alpha_t * jnp.expm1(-h2) * m_prev - 0.5 * alpha_t * jnp.expm1(-h2) * d1
        )
        out = jnp.where(last, m, jnp.where(order == 1, first, second))
        x_start = jnp.where(order == 1, xf, x_start)
        return out.astype(x.dtype), (x_start, m)


@dataclass(frozen=True)
class DEIS(Sampler):
    """diffusers DEISMultistepScheduler (log-ρ DEIS, order 2 by default) with flow sigmas: Adams–
    Bashforth on ε = (x − α·x0)/σ in ρ = σ/α, lower orders while the history fills and (for fewer than
    15 steps) near the end. diffusers' flow variant repeats its last sigma instead of ending at 0
    (its output keeps that noise); here the last step goes to σ = 0 and returns x0."""

    order: int = 2
    sigma_one: float = 1 - 1e-4

    def init_state(self, x):
        return jnp.zeros((max(self.order - 1, 1), *x.shape), F32)

    def step(self, model, i, x, state, sigmas, noise):
        steps = sigmas.shape[0] - 1
        sig = [cap_one(_at(sigmas, i - k), self.sigma_one) for k in range(self.order)]
        sigma, sigma_next = sig[0], sigmas[i + 1]
        xf = x.astype(F32)
        alpha_s = 1 - sigma
        x0 = xf - sigma * velocity(model, x, sigma)
        eps = (xf - alpha_s * x0) / sigma
        last = sigma_next == 0
        s_next = jnp.where(last, sigma * 0.5, sigma_next)
        alpha_t, lam_t = _flow_alpha_lambda(s_next)
        h = lam_t - half_log_snr(sigma)
        branches = [(alpha_t / alpha_s) * xf - s_next * jnp.expm1(h) * eps]
        log_rho = [jnp.log(s / (1 - s)) for s in sig]
        log_t = jnp.log(s_next / alpha_t)
        rho_t = s_next / alpha_t
        rho = [s / (1 - s) for s in sig]
        ms = [eps] + [state[k] for k in range(self.order - 1)]
        if self.order >= 2:

            def ind2(t, lt, lb, lc):
                return t * (-lc + lt - 1) / (lb - lc)

            c1 = ind2(rho_t, log_t, log_rho[0], log_rho[1]) - ind2(rho[0], log_rho[0], log_rho[0], log_rho[1])
            c2 = ind2(rho_t, log_t, log_rho[1], log_rho[0]) - ind2(rho[0], log_rho[0], log_rho[1], log_rho[0])
            branches.append(alpha_t * (xf / alpha_s + c1 * ms[0] + c2 * ms[1]))
        if self.order >= 3:

            def ind3(t, lt, lb, lc, ld):
                num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
                return num / ((lb - lc) * (lb - ld))

            lr = log_rho
            c1 = ind3(rho_t, log_t, lr[0], lr[1], lr[2]) - ind3(rho[0], lr[0], lr[0], lr[1], lr[2])
            c2 = ind3(rho_t, log_t, lr[1], lr[2], lr[0]) - ind3(rho[0], lr[0], lr[1], lr[2], lr[0])
            c3 = ind3(rho_t, log_t, lr[2], lr[0], lr[1]) - ind3(rho[0], lr[0], lr[2], lr[0], lr[1])
            branches.append(alpha_t * (xf / alpha_s + c1 * ms[0] + c2 * ms[1] + c3 * ms[2]))
        order = jnp.minimum(i + 1, self.order)
        if steps < 15:  # diffusers' lower_order_final / lower_order_second
            order = jnp.where(i == steps - 1, 1, jnp.where(i == steps - 2, jnp.minimum(order, 2), order))
        out = jnp.where(last, x0, _select(order, branches))
        new_state = _push(state, eps) if self.order > 1 else state
        return out.astype(x.dtype), new_state


def _unipc_coefficients(h, rks_list, order: int):
    """UniPC (bh2, predict x0) for `order`: (h·φ₁, B(h), b[0:order], R(order × order))."""
    hh = -h
    h_phi_1 = jnp.expm1(hh)
    b_h = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b = []
    for p in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= p + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    rks = jnp.stack([*rks_list, jnp.ones((), F32)])
    R = jnp.stack([rks**p for p in range(order)])
    return h_phi_1, b_h, jnp.stack(b), R


@dataclass(frozen=True)
class UniPC(Sampler):
    """diffusers UniPCMultistepScheduler (bh2, predict_x0, lower_order_final) with flow sigmas.

    Each step first corrects the current sample with UniC (using the model output just computed at it,
    the previous sample and the history), then predicts with UniP. A first σ of 1 becomes 1 − 1e-6,
    as diffusers does to keep log α finite.
    """

    order: int = 2
    sigma_one: float = 1 - 1e-6

    def init_state(self, x):
        return jnp.zeros(x.shape, F32), jnp.zeros((self.order, *x.shape), F32)  # previous x, x0 history

    def step(self, model, i, x, state, sigmas, noise):
        last_x, ms = state
        steps = sigmas.shape[0] - 1
        sig = [cap_one(_at(sigmas, i - k), self.sigma_one) for k in range(self.order + 1)]
        lam = [half_log_snr(s) for s in sig]
        sigma, sigma_next = sig[0], sigmas[i + 1]
        xf = x.astype(F32)
        m = xf - sigma * velocity(model, x, sigma)

        # UniC: correct x_i with m_i; the previous predictor (order o_c) went from x_{i-1} at sig[1].
        o_c = jnp.minimum(jnp.minimum(self.order, steps - i + 1), jnp.maximum(i, 1))
        h = lam[0] - lam[1]
        alpha_t = 1 - sigma
        corrected = []
        for o in range(1, self.order + 1):
            rks = [(lam[1 + k] - lam[1]) / h for k in range(1, o)]
            h_phi_1, b_h, b, R = _unipc_coefficients(h, rks, o)
            rhos = jnp.full((1,), 0.5, F32) if o == 1 else jnp.linalg.solve(R, b)
            res = rhos[-1] * (m - ms[0])
            for k in range(1, o):
                res = res + rhos[k - 1] * (ms[k] - ms[0]) / rks[k - 1]
            base = (sigma / sig[1]) * last_x - alpha_t * h_phi_1 * ms[0]
            corrected.append(base - alpha_t * b_h * res)
        xf = jnp.where(i > 0, _select(o_c, corrected), xf)

        # UniP: predict x_{i+1}.
        o_p = jnp.minimum(jnp.minimum(self.order, steps - i), i + 1)
        last = sigma_next == 0
        s_next = jnp.where(last, sigma * 0.5, sigma_next)
        alpha_n, lam_n = _flow_alpha_lambda(s_next)
        h = lam_n - lam[0]
        history = [m] + [ms[k] for k in range(self.order - 1)]  # m_i, m_{i-1}, ...
        predicted = []
        for o in range(1, self.order + 1):
            rks = [(lam[k] - lam[0]) / h for k in range(1, o)]
            h_phi_1, b_h, b, R = _unipc_coefficients(h, rks, o)
            out = (s_next / sigma) * xf - alpha_n * h_phi_1 * m
            if o > 1:
                rhos = jnp.full((1,), 0.5, F32) if o == 2 else jnp.linalg.solve(R[:-1, :-1], b[:-1])
                res = sum(rhos[k - 1] * (history[k] - m) / rks[k - 1] for k in range(1, o))
                out = out - alpha_n * b_h * res
            predicted.append(out)
        out = jnp.where(last, m, _select(o_p, predicted))
        return out.astype(x.dtype), (xf, _push(ms, m))
