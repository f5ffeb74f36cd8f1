"""The sampler's schedule must be the one diffusers' Klein pipelines use, value for value."""

from __future__ import annotations

import numpy as np
import pytest

from flowgen.engine.sampling import flow_schedule as sampler
from flowgen.engine.sampling.base import euler_step
from tests.engine.fixtures_scheduler import KLEIN_SCHEDULER_CONFIG

# flux2_klein.md §6.1: (height, width, steps, mu, schedule head)
REFERENCE_TABLE = [
    (512, 512, 4, 2.030690, [1.0, 0.958085, 0.883982, 0.717497, 0.0]),
    (768, 768, 4, 2.139227, [1.0, 0.962234, 0.894658, 0.738969, 0.0]),
    (1024, 1024, 4, 2.291180, [1.0, 0.967384, 0.908144, 0.767200, 0.0]),
    (768, 1360, 4, 2.289823, [1.0, 0.967341, 0.908031, 0.766958, 0.0]),
    (1440, 1440, 4, 1.827754, [1.0, 0.949135, 0.861494, 0.674617, 0.0]),
    (2048, 2048, 4, 3.229986, [1.0, 0.986986, 0.961947, 0.893915, 0.0]),
]


def _diffusers_schedule(num_steps: int, image_seq_len: int):
    """Exactly the pipeline's calls: sigmas, mu, retrieve_timesteps -> scheduler.sigmas / timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import compute_empirical_mu, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(KLEIN_SCHEDULER_CONFIG)
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
    base = np.linspace(1.0, 1 / num_steps, num_steps)
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=base, mu=mu)
    return mu, scheduler.sigmas.numpy(), timesteps


@pytest.mark.parametrize("steps", [1, 4, 8, 28, 50])
@pytest.mark.parametrize("hw", [(256, 256), (512, 512), (1024, 1024), (768, 1360), (1440, 1440), (2048, 2048),
                                (1072, 1072)])
def test_schedule_is_bit_identical_to_diffusers(hw, steps):
    tokens = (hw[0] // 16) * (hw[1] // 16)
    mu, ref_sigmas, ref_timesteps = _diffusers_schedule(steps, tokens)
    assert sampler.empirical_mu(tokens, steps) == mu
    ours = sampler.sigmas(steps, tokens)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
    np.testing.assert_array_equal(ours, ref_sigmas)
    # what the pipeline feeds the transformer in float32 mode: (t.expand(B).to(float32)) / 1000
    fed = ref_timesteps.to(ref_timesteps.dtype) / 1000
    assert fed.dtype.is_floating_point and str(fed.dtype) == "torch.float32"
    np.testing.assert_array_equal(sampler.model_timesteps(ours), fed.numpy())


@pytest.mark.parametrize("height, width, steps, mu, head", REFERENCE_TABLE)
def test_reference_table(height, width, steps, mu, head):
    tokens = (height // 16) * (width // 16)
    assert sampler.empirical_mu(tokens, steps) == pytest.approx(mu, abs=1e-6)
    np.testing.assert_allclose(sampler.sigmas(steps, tokens), head, atol=1e-6)


def test_reference_table_50_steps():
    schedule = sampler.sigmas(50, 4096)
    assert sampler.empirical_mu(4096, 50) == pytest.approx(2.023351, abs=1e-6)
    np.testing.assert_allclose(schedule[:3], [1.0, 0.997309, 0.994521], atol=1e-6)
    np.testing.assert_allclose(schedule[-3:], [0.239631, 0.133719, 0.0], atol=1e-6)
    assert np.all(np.diff(schedule) < 0)


def test_large_image_branch_ignores_steps_and_is_discontinuous():
    assert sampler.empirical_mu(8100, 4) == sampler.empirical_mu(8100, 50)
    assert sampler.empirical_mu(4300, 4) != sampler.empirical_mu(4300, 50)
    assert sampler.empirical_mu(4301, 4) < sampler.empirical_mu(4300, 4)


def test_bf16_timesteps_match_diffusers_bf16_rounding():
    import torch

    schedule = sampler.sigmas(4, 4096)
    _, _, ref_timesteps = _diffusers_schedule(4, 4096)
    fed = (ref_timesteps.to(torch.bfloat16) / 1000).float().numpy()
    quantised = sampler.model_timesteps(schedule, quantize_bf16=True)
    np.testing.assert_array_equal(quantised, fed)
    # the embedded value (transformer multiplies by 1000 in bf16): flux2_klein.md §6.1 says 1000, 968, 908, 768
    embedded = (torch.from_numpy(quantised).to(torch.bfloat16) * 1000).float().numpy()
    np.testing.assert_array_equal(embedded, [1000, 968, 908, 768])
    assert not np.array_equal(quantised, sampler.model_timesteps(schedule))


def test_euler_step_matches_scheduler_step_and_runs_under_jit():
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 64, 128)).astype(np.float32)
    velocities = rng.standard_normal((4, 1, 64, 128)).astype(np.float32)

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(KLEIN_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=sampler.empirical_mu(64, 4))
    scheduler.set_begin_index(0)
    ref = torch.from_numpy(x0)
    for i, t in enumerate(scheduler.timesteps):
        ref = scheduler.step(torch.from_numpy(velocities[i]), t, ref, return_dict=False)[0]

    schedule = jnp.asarray(sampler.sigmas(4, 64))

    @jax.jit
    def run(x, vs):
        body = lambda i, x: euler_step(x, vs[i], schedule[i], schedule[i + 1])  # noqa: E731
        return jax.lax.fori_loop(0, 4, body, x)

    ours = np.asarray(run(jnp.asarray(x0), jnp.asarray(velocities)))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-6)
    assert np.abs(ours - x0).max() > 1.0  # the update actually moved the sample

    # numpy path, and the dtype round trip (bf16 latents come back as bf16)
    x_np = euler_step(x0, velocities[0], np.float32(1.0), np.float32(0.5))
    np.testing.assert_allclose(x_np, x0 - 0.5 * velocities[0], atol=1e-6)
    x_bf16 = euler_step(jnp.asarray(x0, jnp.bfloat16), jnp.asarray(velocities[0]), schedule[0], schedule[1])
    assert x_bf16.dtype == jnp.bfloat16
