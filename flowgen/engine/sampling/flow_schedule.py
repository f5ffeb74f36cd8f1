"""FLUX.2 [klein]'s own sigma schedule (the resolution-dependent shift) and the model time fed to the transformer.

The schedule reproduces, value for value, what diffusers' Klein pipelines get from
`FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/N, N), mu=empirical_mu(L, N))`
with the Klein scheduler config (dynamic shifting, exponential time shift): the shift is computed in
float32 numpy exactly as the scheduler does, so the sigmas are bit-identical, not merely close.
BFL's `get_schedule` computes the same formula in float64; the two agree to ~1e-7.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000  # the scheduler's timestep scale: t = 1000 * sigma

# Fits of the shift mu to image-token count at 10 and 200 steps (diffusers `compute_empirical_mu`,
# BFL `compute_empirical_mu`); for large images only the 200-step fit is used.
_A1, _B1 = 8.73809524e-05, 1.89833333
_A2, _B2 = 0.00016927, 0.45666666
_LARGE_IMAGE_TOKENS = 4300


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The time-shift exponent mu for `image_seq_len` output tokens ((H/16)*(W/16)) and `num_steps`.

    Above 4300 tokens mu depends on the token count only; below, it interpolates linearly in the
    step count between the 10-step and 200-step fits. References never count towards the length.
    """
    m200 = _A2 * image_seq_len + _B2
    if image_seq_len > _LARGE_IMAGE_TOKENS:
        return float(m200)
    m10 = _A1 * image_seq_len + _B1
    slope = (m200 - m10) / 190.0
    return float(slope * num_steps + (m200 - 200.0 * slope))


def sigmas(num_steps: int, image_seq_len: int) -> np.ndarray:
    """The (num_steps + 1,) float32 noise levels, from 1.0 down to a terminal 0.0.

    Base grid linspace(1, 1/N, N) (float64, then float32 as the scheduler casts it), shifted by
    t -> e^mu / (e^mu + (1/t - 1)) in float32 arithmetic, then a 0 appended.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    exp_mu = np.float32(math.exp(empirical_mu(image_seq_len, num_steps)))
    one = np.float32(1.0)
    shifted = exp_mu / (exp_mu + (one / base - one))  # sigma exponent 1.0: x**1.0 is exact, so omitted
    return np.concatenate([shifted.astype(np.float32), np.zeros(1, np.float32)])


def model_timesteps(schedule: np.ndarray, *, quantize_bf16: bool = False) -> np.ndarray:
    """The flow time t in [0, 1] the pipeline hands the transformer at each step: (N,) float32.

    `schedule` is the (N+1,) output of `sigmas()`; the terminal 0 gets no model call. diffusers
    computes `timesteps = sigma * 1000` and feeds `timestep / 1000` — two float32 roundings, so t can
    differ from sigma by an ulp; in float32 mode nothing else rounds it. The transformer multiplies
    by 1000 again before its sinusoidal embedding (that is the transformer's business, not this one).

    quantize_bf16=True mimics diffusers running in bfloat16 (flux2_klein.md §6.1): the timestep is
    cast to the latent dtype, bf16(1000 sigma), and divided by 1000 in bf16. Off by default: the
    Euler update always uses the unquantised sigmas, and float32 parity needs the plain values.
    """
    sigma = np.asarray(schedule, dtype=np.float32)[:-1]
    scale = np.float32(NUM_TRAIN_TIMESTEPS)
    t_train = sigma * scale
    if quantize_bf16:
        bf16 = ml_dtypes.bfloat16
        return (t_train.astype(bf16) / np.array(scale, dtype=bf16)).astype(np.float32)
    return (t_train / scale).astype(np.float32)
