"""Sigma schedules for a flow model: (steps + 1,) float32 noise levels from sigma_max down to a terminal 0.

Every schedule takes (steps, image_seq_len), so each one inherits Klein's resolution-dependent shift:

* `default`      Klein's own shifted schedule (`flow_schedule.sigmas`), what diffusers' Klein pipelines use.
* `karras`, `exponential`, `beta`, `uniform`
                 the same end points as `default`, sigma_max = 1 and sigma_min = the last nonzero sigma
                 of `default` (for 4 steps at 1024² about 0.77, for 28 steps about 0.24), re-spaced:
                 Karras ρ = 7, log-linear, Beta(0.6, 0.6) quantiles, linear. These are exactly what
                 diffusers' `FlowMatchEulerDiscreteScheduler` gives with the Klein config and
                 `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas` (it re-spaces
                 between the first and last shifted sigma, computed in float64 and cast to float32);
                 `uniform` is the linear member of that family. ComfyUI's Karras for Flux instead spans
                 down to its model_sampling's sigma_min (~1e-4), which spends most of a few-step budget
                 at almost no noise; the shifted end points keep a 4-step schedule usable.
* `diffusers_flow`
                 the flow sigmas of diffusers' DPM-Solver / DEIS schedulers (`use_flow_sigmas=True`,
                 dynamic exponential shift with Klein's mu): shift(0.999·k/N) for k = N..1, so the first
                 sigma is just below 1 (its log-SNR stays finite), then 0.

numpy only (scipy for the Beta quantiles): the recipe layer may import this without JAX.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from flowgen.engine.sampling import flow_schedule


def default(steps: int, image_seq_len: int) -> np.ndarray:
    return flow_schedule.sigmas(steps, image_seq_len)


def _bounds(steps: int, image_seq_len: int) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the default schedule, as Python floats (diffusers' `.item()`)."""
    shifted = flow_schedule.sigmas(steps, image_seq_len)[:-1]
    return float(shifted[0]), float(shifted[-1])


def _finish(sigmas) -> np.ndarray:
    return np.concatenate([np.asarray(sigmas, dtype=np.float64).astype(np.float32), np.zeros(1, np.float32)])


def karras(steps: int, image_seq_len: int, rho: float = 7.0) -> np.ndarray:
    sigma_max, sigma_min = _bounds(steps, image_seq_len)
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(steps: int, image_seq_len: int) -> np.ndarray:
    sigma_max, sigma_min = _bounds(steps, image_seq_len)
    return _finish(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps)))


def beta(steps: int, image_seq_len: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    import scipy.stats

    sigma_max, sigma_min = _bounds(steps, image_seq_len)
    ppf = [scipy.stats.beta.ppf(t, a, b) for t in 1 - np.linspace(0, 1, steps)]
    return _finish([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def uniform(steps: int, image_seq_len: int) -> np.ndarray:
    sigma_max, sigma_min = _bounds(steps, image_seq_len)
    return _finish(np.linspace(sigma_max, sigma_min, steps))


def diffusers_flow(steps: int, image_seq_len: int) -> np.ndarray:
    if steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {steps}")
    shift = np.exp(flow_schedule.empirical_mu(image_seq_len, steps))
    s = 1.0 - np.linspace(1, 1 / flow_schedule.NUM_TRAIN_TIMESTEPS, steps + 1)
    shifted = np.flip(shift * s / (1 + (shift - 1) * s))[:-1]
    return _finish(shifted)


SCHEDULES: dict[str, Callable[[int, int], np.ndarray]] = {
    "default": default,
    "karras": karras,
    "exponential": exponential,
    "beta": beta,
    "uniform": uniform,
    "diffusers_flow": diffusers_flow,
}


def sigmas(schedule: str, steps: int, image_seq_len: int) -> np.ndarray:
    """The (steps + 1,) float32 schedule `schedule` (a key of SCHEDULES), ending in 0."""
    if steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {steps}")
    return SCHEDULES[schedule](steps, image_seq_len)
