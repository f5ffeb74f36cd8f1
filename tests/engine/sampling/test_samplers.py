"""The samplers against their references, on a toy flow model (the exact velocity of a Gaussian mixture).

* diffusers, where it has a flow-matching implementation (FlowMatchEuler with its Karras option,
  FlowMatchHeun, FlowMatchLCM, and DPMSolverMultistep / Singlestep, DEIS, UniPC with
  `use_flow_sigmas=True, prediction_type="flow_prediction"`);
* k-diffusion 0.1.1 (`k_diffusion/sampling.py`, loaded by file path) on the same model wrapped as a
  denoiser x0 = x − σ·v. The flow-aware samplers (ComfyUI's half-log-SNR forms) are k-diffusion's
  variance-exploding formulas after the change of variables x_ve = x/(1 − σ), σ_ve = σ/(1 − σ);
* ComfyUI's RF / iPNDM formulas (not in k-diffusion 0.1.1), transcribed below in torch.

Stochastic samplers are fed the noise the loop draws (`denoise.row_noise`, per row from its seed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowgen.engine.sampling import flow_schedule, multistep, names, samplers, schedules
from flowgen.engine.sampling import loop as denoise
from flowgen.engine.sampling.base import FlowEuler, Sampler
from tests.engine.fixtures_scheduler import KLEIN_SCHEDULER_CONFIG

# diffusers' schedulers trip numpy 2 deprecation warnings of their own
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 6, 4)
SEEDS = (11, 12)
TOKENS = 1024  # the image_seq_len the schedules are built for (512x512)
MEAN, WIDTH = 1.0, 0.5  # data: per element ½N(+1, ½²) + ½N(−1, ½²)


def _denoised(x, t, sigmoid):
    """E[x0 | x_t] for the mixture, x_t = (1 − t)·x0 + t·ε (works on jax and torch values)."""
    var = ((1 - t) * WIDTH) ** 2 + t**2
    w = sigmoid(2 * MEAN * (1 - t) * x / var)
    gain = (1 - t) * WIDTH**2 / var
    up = MEAN + gain * (x - (1 - t) * MEAN)
    down = -MEAN + gain * (x + (1 - t) * MEAN)
    return w * up + (1 - w) * down


def model(x, sigma):
    x = x.astype(jnp.float32)
    return (x - _denoised(x, sigma, jax.nn.sigmoid)) / sigma


def torch_v(x, sigma):
    return (x - _denoised(x, sigma, torch.sigmoid)) / sigma


def torch_denoiser(x, sigma):
    """k-diffusion's view of the flow model: x0 = x − σ·v (sigma: a (B,) tensor)."""
    s = sigma[0]
    return x - s * torch_v(x, s)


@pytest.fixture(scope="module")
def x0():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def kd():
    """k_diffusion.sampling, loaded by path with a stub package: its __init__ imports torchvision etc."""
    try:
        path = importlib.metadata.distribution("k-diffusion").locate_file("k_diffusion/sampling.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("k-diffusion is a test dependency: pip install --no-deps k-diffusion==0.1.1.post1")
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    package, utils = types.ModuleType("k_diffusion"), types.ModuleType("k_diffusion.utils")
    package.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    try:
        spec = importlib.util.spec_from_file_location("k_diffusion.sampling", str(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def _whole_loop(sampler, x, sigmas, keys):
    """Every step in one call: the loop's carry from the sampler's initial state, steps [0, N)."""
    carry = (x, sampler.init_state(x))
    return denoise.sample(sampler, model, carry, sigmas, keys, 0, sigmas.shape[0] - 1)[0]


_LOOP = jax.jit(_whole_loop, static_argnums=0)


def run(sampler: Sampler, x, sigmas, seeds=SEEDS) -> np.ndarray:
    """The whole loop, compiled (denoise.sample under jit)."""
    out = _LOOP(sampler, jnp.asarray(x), jnp.asarray(sigmas, jnp.float32), denoise.noise_keys(seeds))
    return np.asarray(out)


def run_steps(sampler: Sampler, x, sigmas, steps: int, seeds=SEEDS) -> np.ndarray:
    """The first `steps` steps, eagerly (for comparing an intermediate sample)."""
    keys, sigmas, x = denoise.noise_keys(seeds), jnp.asarray(sigmas, jnp.float32), jnp.asarray(x)
    state = sampler.init_state(x)
    shape = x.shape[1:]  # every step keeps the sample's shape
    for i in range(steps):
        x, state = sampler.step(model, i, x, state, sigmas, lambda i, k=0: denoise.row_noise(keys, i, k, shape))
    return np.asarray(x)


def drawn(i: int, k: int = 0, seeds=SEEDS) -> np.ndarray:
    """The noise the loop hands a sampler at step i, draw k."""
    return np.asarray(denoise.row_noise(denoise.noise_keys(seeds), i, k, SHAPE[1:]))


class Replay:
    """A k-diffusion noise sampler returning the given draws in order."""

    def __init__(self, draws):
        self.draws = [torch.tensor(np.array(d), dtype=torch.float64) for d in draws]

    def __call__(self, *_):
        return self.draws.pop(0)


def t64(a):
    return torch.tensor(np.array(a), dtype=torch.float64)


def in_ve(kd_sampler, x, sigmas, **kwargs) -> np.ndarray:
    """Run a k-diffusion (variance-exploding) sampler on the flow model in VE coordinates."""
    s = t64(sigmas)
    s_ve = s / (1 - s)

    def denoiser(x_ve, sigma_ve):
        sigma = sigma_ve / (1 + sigma_ve)
        return torch_denoiser(x_ve * (1 - sigma[0]), sigma)

    out = kd_sampler(denoiser, t64(x) / (1 - s[0]), s_ve, disable=True, **kwargs)
    return out.numpy()  # at σ = 0, x_ve = x


def capped(sigmas, value=1 - 1e-4):
    s = np.array(sigmas, np.float32)
    s[s >= 1] = np.float32(value)
    return s


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)


# ---- k-diffusion, directly on the flow denoiser -----------------------------------------------


@pytest.mark.parametrize("sampler, reference", [
    (FlowEuler(), "sample_euler"),
    (samplers.Heun(), "sample_heun"),
    (samplers.DPM2(), "sample_dpm_2"),
    (multistep.DPMSolverPP(order=2), "sample_dpmpp_2m"),
    (multistep.DPMSolverPP(order=3), "sample_dpmpp_3m_sde"),
], ids=["euler", "heun", "dpm_2", "dpmpp_2m", "dpmpp_3m"])
@pytest.mark.parametrize("schedule", ["default", "karras"])
def test_deterministic_samplers_equal_k_diffusion(kd, x0, sampler, reference, schedule):
    sigmas = schedules.sigmas(schedule, 8, TOKENS)
    kwargs = {"eta": 0.0, "noise_sampler": Replay([])} if reference == "sample_dpmpp_3m_sde" else {}
    expected = getattr(kd, reference)(torch_denoiser, t64(x0), t64(sigmas), disable=True, **kwargs).numpy()
    close(run(sampler, x0, sigmas), expected)


def test_lms_equals_k_diffusion_then_comfyui_final_denoise(kd, x0):
    sigmas = schedules.default(8, TOKENS)
    before_last = kd.sample_lms(torch_denoiser, t64(x0), t64(sigmas[:-1]), disable=True)  # the first 7 steps
    expected = torch_denoiser(before_last, t64(sigmas[-2:-1])).numpy()  # ComfyUI: the last step is x0
    close(run(multistep.LMS(), x0, sigmas), expected)


# ---- k-diffusion in VE coordinates = ComfyUI's flow (half-log-SNR) forms -----------------------


@pytest.mark.parametrize("sampler, reference", [
    (multistep.DPMSolverPP(order=2, eta=1.0, flow=True), "sample_dpmpp_2m_sde"),
    (multistep.DPMSolverPP(order=3, eta=1.0, flow=True), "sample_dpmpp_3m_sde"),
], ids=["dpmpp_2m_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("schedule", ["default", "uniform"])
def test_flow_sde_samplers_equal_k_diffusion_in_ve_coordinates(kd, x0, sampler, reference, schedule):
    sigmas = schedules.sigmas(schedule, 8, TOKENS)
    noise = Replay([drawn(i) for i in range(len(sigmas) - 2)])  # one draw per step, none on the last
    expected = in_ve(getattr(kd, reference), x0, capped(sigmas), noise_sampler=noise)
    assert not noise.draws
    close(run(sampler, x0, sigmas), expected, tol=5e-5)


def test_dpmpp_sde_equals_k_diffusion_in_ve_coordinates(kd, x0):
    sigmas = schedules.karras(6, TOKENS)
    s = capped(sigmas).astype(np.float64)
    draws = []
    for i in range(len(s) - 2):  # the two Brownian increments of each step but the last
        lam = np.log((1 - s[i]) / s[i]), np.log((1 - s[i + 1]) / s[i + 1])
        sigma_mid = 1 / (1 + np.exp(lam[0] + 0.5 * (lam[1] - lam[0])))
        rho = (s[i] - sigma_mid) / (s[i] - s[i + 1])
        z0, z1 = drawn(i, 0), drawn(i, 1)
        draws += [z0, np.sqrt(rho) * z0 + np.sqrt(1 - rho) * z1]
    expected = in_ve(kd.sample_dpmpp_sde, x0, s, noise_sampler=Replay(draws))
    close(run(samplers.DPMPPSDE(), x0, sigmas), expected, tol=5e-5)


def test_flow_dpmpp_2m_is_k_diffusion_2m_in_ve_coordinates(kd, x0):
    sigmas = schedules.diffusers_flow(8, TOKENS)
    close(run(multistep.DPMSolverPP(order=2, flow=True), x0, sigmas), in_ve(kd.sample_dpmpp_2m, x0, sigmas), tol=5e-5)


# ---- ComfyUI formulas not in k-diffusion 0.1.1 (transcribed) -----------------------------------


def comfy_euler_ancestral_rf(x, sigmas, noise, eta=1.0):
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        denoised = torch_denoiser(x, s[None])
        if sn == 0:
            x = denoised
            continue
        sigma_down = sn * (1 + (sn / s - 1) * eta)
        alpha_ip1, alpha_down = 1 - sn, 1 - sigma_down
        renoise = (sn**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
        ratio = sigma_down / s
        x = ratio * x + (1 - ratio) * denoised
        x = (alpha_ip1 / alpha_down) * x + noise(s, sn) * renoise
    return x


def comfy_dpm_2_ancestral_rf(x, sigmas, noise, eta=1.0):
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        denoised = torch_denoiser(x, s[None])
        sigma_down = sn * (1 + (sn / s - 1) * eta)
        alpha_ip1, alpha_down = 1 - sn, 1 - sigma_down
        renoise = (sn**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
        d = (x - denoised) / s
        if sigma_down == 0:
            x = x + d * (sigma_down - s)
        else:
            sigma_mid = s.log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - s)
            d_2 = (x_2 - torch_denoiser(x_2, sigma_mid[None])) / sigma_mid
            x = x + d_2 * (sigma_down - s)
            x = (alpha_ip1 / alpha_down) * x + noise(s, sn) * renoise
    return x


def comfy_ipndm(x, sigmas, max_order=4):
    buffer = []
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        denoised = torch_denoiser(x, t[None])
        d = (x - denoised) / t
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t) * d
        elif order == 2:
            x_next = x + (t_next - t) * (3 * d - buffer[-1]) / 2
        elif order == 3:
            x_next = x + (t_next - t) * (23 * d - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            x_next = x + (t_next - t) * (55 * d - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        buffer = (buffer + [d])[-(max_order - 1):]
        x = x_next
    return x


@pytest.mark.parametrize("ours, theirs", [(samplers.EulerAncestralRF(), comfy_euler_ancestral_rf),
                                          (samplers.DPM2AncestralRF(), comfy_dpm_2_ancestral_rf)],
                         ids=["euler_ancestral_RF", "dpm_2_ancestral_RF"])
@pytest.mark.parametrize("schedule", ["default", "exponential"])
def test_rf_ancestral_samplers_equal_comfyui(x0, ours, theirs, schedule):
    sigmas = schedules.sigmas(schedule, 7, TOKENS)
    noise = Replay([drawn(i) for i in range(len(sigmas) - 2)])
    close(run(ours, x0, sigmas), theirs(t64(x0), t64(sigmas), noise).numpy())
    assert not noise.draws


def test_ipndm_equals_comfyui(x0):
    sigmas = schedules.beta(9, TOKENS)
    close(run(multistep.IPNDM(), x0, sigmas), comfy_ipndm(t64(x0), t64(sigmas)).numpy())


def test_rf_ancestral_keeps_the_flow_marginal():
    """The re-noise restores noise σ' exactly: (σ_down·α'/α_down)² + renoise² = σ'² (signal α')."""
    s = jnp.linspace(0.95, 0.05, 10)
    sigma_down, scale, renoise = samplers.rf_renoise(s[:-1], s[1:], 1.0)
    np.testing.assert_allclose((sigma_down * scale) ** 2 + renoise**2, s[1:] ** 2, rtol=1e-5)
    np.testing.assert_allclose((1 - sigma_down) * scale, 1 - s[1:], rtol=1e-6)


def test_tcd_limits(x0):
    sigmas = schedules.default(6, TOKENS)
    close(run(samplers.FlowTCD(gamma=0.0), x0, sigmas), run(FlowEuler(), x0, sigmas), tol=1e-5)
    assert not np.allclose(run(samplers.FlowTCD(gamma=0.3), x0, sigmas), run(FlowEuler(), x0, sigmas), atol=1e-3)


# ---- diffusers' flow schedulers ------------------------------------------------------------------


def diffusers_loop(scheduler, x, sigma_of_step, steps, noise=None):
    """The pipeline's loop with the toy model in float32; sigma_of_step(i, t) is the model's level."""
    x = torch.as_tensor(x)
    for i, t in enumerate(scheduler.timesteps[:steps]):
        v = torch_v(x, torch.as_tensor(sigma_of_step(i, t), dtype=torch.float32))
        extra = {} if noise is None else {"variance_noise": torch.tensor(noise(i))}
        x = scheduler.step(v, t, x, return_dict=False, **extra)[0]
    return x.numpy()


def flow_scheduler(cls, steps, **config):
    scheduler = cls(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True,
                    time_shift_type="exponential", **config)
    scheduler.set_timesteps(steps, mu=flow_schedule.empirical_mu(TOKENS, steps))
    scheduler.set_begin_index(0)
    return scheduler


def test_flow_match_euler_karras_equals_diffusers(x0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 8
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({**KLEIN_SCHEDULER_CONFIG, "use_karras_sigmas": True})
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flow_schedule.empirical_mu(TOKENS, steps))
    np.testing.assert_array_equal(scheduler.sigmas.numpy(), schedules.karras(steps, TOKENS))
    expected = diffusers_loop(scheduler, x0, lambda i, t: scheduler.sigmas[i], steps)
    close(run(FlowEuler(), x0, schedules.karras(steps, TOKENS)), expected, tol=1e-5)


def test_heun_equals_diffusers_flow_match_heun(x0):
    from diffusers import FlowMatchHeunDiscreteScheduler

    steps = 6
    scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    expected = diffusers_loop(scheduler, x0, lambda i, t: t / 1000, len(scheduler.timesteps))
    sigmas = np.concatenate([scheduler.sigmas.numpy()[:-1:2], [0.0]])  # [s0, s1, s1, s2, ..., 0] -> [s0, ..., 0]
    close(run(samplers.Heun(), x0, sigmas), expected, tol=1e-5)


def test_lcm_equals_diffusers_flow_match_lcm(x0, monkeypatch):
    from diffusers import FlowMatchLCMScheduler
    from diffusers.schedulers import scheduling_flow_match_lcm

    steps = 4
    scheduler = FlowMatchLCMScheduler.from_config(KLEIN_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flow_schedule.empirical_mu(TOKENS, steps))
    np.testing.assert_array_equal(scheduler.sigmas.numpy(), schedules.default(steps, TOKENS))
    draws = [torch.tensor(drawn(i)) for i in range(steps)]
    monkeypatch.setattr(scheduling_flow_match_lcm, "randn_tensor", lambda *a, **k: draws.pop(0))
    expected = diffusers_loop(scheduler, x0, lambda i, t: scheduler.sigmas[i], steps)
    close(run(samplers.FlowTCD(gamma=1.0), x0, schedules.default(steps, TOKENS)), expected, tol=1e-5)


@pytest.mark.parametrize("steps", [5, 8])
def test_dpmsolver_multistep_equals_diffusers_flow(x0, steps):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = flow_scheduler(DPMSolverMultistepScheduler, steps)
    np.testing.assert_array_equal(scheduler.sigmas.numpy(), schedules.diffusers_flow(steps, TOKENS))
    expected = diffusers_loop(scheduler, x0, lambda i, t: scheduler.sigmas[i], steps)
    choice = names.resolve("DPMSolverMultistepScheduler")
    close(run(choice.sampler(), x0, choice.sigmas(steps, TOKENS)), expected, tol=2e-5)


def test_ddpm_equals_diffusers_sde_dpmsolver_first_order(x0):
    from diffusers import DPMSolverMultistepScheduler

    steps = 6
    scheduler = flow_scheduler(DPMSolverMultistepScheduler, steps, algorithm_type="sde-dpmsolver++", solver_order=1)
    expected = diffusers_loop(scheduler, x0, lambda i, t: scheduler.sigmas[i], steps, noise=drawn)
    ours = multistep.DPMSolverPP(order=1, eta=1.0, flow=True)
    close(run(ours, x0, schedules.diffusers_flow(steps, TOKENS)), expected, tol=2e-5)


@pytest.mark.parametrize("steps", [5, 8])
def test_dpmsolver_singlestep_equals_diffusers_flow(x0, steps):
    from diffusers import DPMSolverSinglestepScheduler

    scheduler = flow_scheduler(DPMSolverSinglestepScheduler, steps)
    expected = diffusers_loop(scheduler, x0, lambda i, t: scheduler.sigmas[i], steps)
    choice = names.resolve("DPMSolverSinglestepScheduler")
    close(run(choice.sampler(), x0, choice.sigmas(steps, TOKENS)), expected, tol=2e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_deis_equals_diffusers_flow_before_its_last_step(x0, order):
    """diffusers' flow DEIS repeats its last sigma (a no-op last step, the output keeps that noise);
    flowgen's last step goes to 0. Every step before that is diffusers' own."""
    from diffusers import DEISMultistepScheduler

    steps = 8
    scheduler = flow_scheduler(DEISMultistepScheduler, steps, solver_order=order)
    expected = diffusers_loop(scheduler, x0, lambda i, t: scheduler.sigmas[i], steps)
    ours = multistep.DEIS(order=order)
    sigmas = schedules.diffusers_flow(steps, TOKENS)
    close(run_steps(ours, x0, sigmas, steps - 1), expected, tol=2e-5)
    final = run(ours, x0, sigmas)
    close(final, run_steps(ours, x0, sigmas, steps))


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [4, 9])
def test_unipc_equals_diffusers_flow(x0, order, steps):
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=order,
                                        use_dynamic_shifting=True, time_shift_type="exponential")
    base = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    scheduler.set_timesteps(sigmas=base, mu=flow_schedule.empirical_mu(TOKENS, steps))
    scheduler.set_begin_index(0)
    sigmas = schedules.default(steps, TOKENS)
    np.testing.assert_array_equal(scheduler.sigmas.numpy()[1:], sigmas[1:])  # diffusers: σ0 = 1 − 1e-6
    expected = diffusers_loop(scheduler, x0, lambda i, t: scheduler.sigmas[i], steps)
    close(run(multistep.UniPC(order=order), x0, sigmas), expected, tol=5e-5)  # float32 solves at λ ≈ −14


# ---- properties ------------------------------------------------------------------------------------


def test_second_order_samplers_converge_faster_than_euler(x0):
    """8 steps on σ = linspace(1, 0): every higher-order sampler lands closer to the 100-step Euler
    solution than 8 Euler steps do (RMS over the batch)."""
    reference = run(FlowEuler(), x0, np.linspace(1, 0, 101))
    coarse = np.linspace(1, 0, 9)

    def error(sampler):
        return float(np.sqrt(np.mean((run(sampler, x0, coarse) - reference) ** 2)))

    euler = error(FlowEuler())
    errors = {name: error(names.SchedulerChoice(name, name, "default").sampler())
              for name in ("heun", "dpmpp_2m", "unipc", "unipc_3m", "dpm_2", "lms", "dpmpp_3m", "dpmsolver_multistep",
                           "dpmsolver_singlestep", "deis")}
    print(f"\nRMS error vs 100-step Euler at 8 steps: euler {euler:.4f}, "
          + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert all(e < euler for e in errors.values()), (euler, errors)
    assert errors["heun"] < euler / 4 and errors["unipc"] < euler / 2


STOCHASTIC = [name for name, (_, _, _, stochastic) in names.SAMPLERS.items() if stochastic]


@pytest.mark.slow
@pytest.mark.parametrize("sampler_name", STOCHASTIC)
def test_stochastic_samplers_are_deterministic_per_row(x0, sampler_name):
    sampler = names.SchedulerChoice(sampler_name, sampler_name, "default").sampler()
    assert sampler.stochastic
    sigmas = schedules.default(6, TOKENS)
    first, again = run(sampler, x0, sigmas), run(sampler, x0, sigmas)
    np.testing.assert_array_equal(first, again)
    alone = run(sampler, x0[1:], sigmas, seeds=SEEDS[1:])
    np.testing.assert_allclose(first[1:], alone, rtol=0, atol=1e-6)
    other_seed = run(sampler, x0[1:], sigmas, seeds=(99,))
    assert not np.allclose(alone, other_seed, atol=1e-3)  # the noise really comes from the row's seed


@pytest.mark.parametrize("sampler_name", sorted(set(names.SAMPLERS) - set(STOCHASTIC)))
def test_deterministic_samplers_ignore_the_seed(x0, sampler_name):
    sampler = names.SchedulerChoice(sampler_name, sampler_name, "default").sampler()
    assert not sampler.stochastic
    sigmas = schedules.default(5, TOKENS)
    out = run(sampler, x0, sigmas)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, run(sampler, x0, sigmas, seeds=(3, 4)))


@pytest.mark.slow
@pytest.mark.parametrize("sampler_name", list(names.SAMPLERS))
def test_a_one_step_schedule_denoises(x0, sampler_name):
    """[1, 0]: every sampler returns the model's x0 (log-SNR samplers ask the model at 1 − ε)."""
    sigmas = schedules.default(1, TOKENS)
    sampler = names.SchedulerChoice(sampler_name, sampler_name, "default").sampler()
    close(run(sampler, x0, sigmas), run(FlowEuler(), x0, sigmas), tol=1e-3)


def test_bf16_tokens_stay_bf16(x0):
    x = jnp.asarray(x0, jnp.bfloat16)
    out = _LOOP(multistep.UniPC(), x, jnp.asarray(schedules.default(4, TOKENS)), denoise.noise_keys(SEEDS))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
