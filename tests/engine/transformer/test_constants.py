"""Every constant flowgen computes on the host (or from config only) equals the reference's, bit for bit.

The references compute these tables in torch on the CPU; a different libm (numpy, XLA) rounds a
few entries differently, and a model multiplies those ulps by up to 1000 (timestep) or 511
(positions). Where a torch kernel that is not correctly rounded follows (sin, cos, sqrt: XLA's
against torch's), the check is ≤ 1 ulp.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowgen.engine.catalog.tiny_model import SCHEDULER_CONFIG
from flowgen.engine.sampling import flow_schedule
from flowgen.engine.text.qwen3 import Qwen3EncoderConfig, _inv_freq, _rope_tables
from flowgen.engine.transformer import positions as ids
from flowgen.engine.transformer import time_embedding
from flowgen.engine.transformer.model import timestep_embedding
from flowgen.engine.transformer.rope import rope_tables

torch.set_grad_enabled(False)
SIN_COS_ULP = 2.0**-24  # one ulp of float32 values in [0.5, 1): what torch's and XLA's sin/cos may differ by


def bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


# ---- the DiT's timestep embedding --------------------------------------------------------------


def _torch_table_here(half: int = 128) -> np.ndarray:
    """The frequency table diffusers builds on this machine (torch float32 exp)."""
    return torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).numpy()


def _argument_shift(scaled_t: np.ndarray) -> float:
    """max |Δ| of the sinusoid arguments 1000·t·f between this machine's torch table and the stored one.

    torch's float32 exp is not correctly rounded, and its vector kernels differ by CPU (AVX2 vs
    AVX-512): the stored table is torch's on the machine that made it, and torch here may differ
    from it by 1 ulp in a few entries. 0 where they agree; a sin/cos then moves by at most this."""
    here = _torch_table_here()
    stored = time_embedding.frequencies(128)
    args_here = scaled_t.astype(np.float32)[:, None] * here[None, :]
    args_stored = scaled_t.astype(np.float32)[:, None] * stored[None, :]
    return float(np.max(np.abs(args_here.astype(np.float64) - args_stored)))


def test_frequency_table_is_torchs():
    """Stored bit for bit from torch; torch on this CPU is within 1 ulp of it, and so is the correctly
    rounded exp of torch's float32 exponent; numpy's float32 exp differs in more entries."""
    stored = time_embedding.frequencies(128)
    here = _torch_table_here()
    np.testing.assert_array_max_ulp(stored, here, maxulp=1)
    exponent = np.float32(-math.log(10000)) * np.arange(128, dtype=np.float32) / np.float32(128)  # as torch rounds it
    correctly_rounded = np.exp(exponent.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_max_ulp(stored, correctly_rounded, maxulp=1)
    differ_here = np.count_nonzero(bits(stored) != bits(here))
    numpy_exp = np.exp(exponent)
    differ_numpy = np.count_nonzero(bits(numpy_exp) != bits(stored))
    print(f"stored table vs torch on this CPU: {differ_here} of 128 entries differ by 1 ulp; numpy's: {differ_numpy}")
    assert differ_numpy > differ_here


def test_other_table_sizes_are_within_one_ulp_of_torch():
    half = 16  # timestep_dim 32 of the loading tests' tiny models
    theirs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).numpy()
    ours = time_embedding.frequencies(half)
    assert ours.dtype == np.float32
    np.testing.assert_array_max_ulp(ours, theirs, maxulp=1)


def _diffusers_time_features(model, t: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """What Flux2Transformer2DModel.forward feeds its timestep MLP: time_proj(timestep.to(dtype) * 1000)."""
    timestep = torch.from_numpy(t).to(dtype) * 1000
    return model.time_guidance_embed.time_proj(timestep).numpy()


@pytest.fixture(scope="module")
def tiny_diffusers():
    from diffusers import Flux2Transformer2DModel

    from tests.engine.fixtures_transformer import TINY

    config = dict(TINY.to_diffusers())
    config.pop("_class_name")
    return Flux2Transformer2DModel(**config).eval()


def _times() -> np.ndarray:
    """A dense grid, random times, and every time a Klein schedule hands the transformer."""
    schedules = [flow_schedule.model_timesteps(flow_schedule.sigmas(n, tokens))
                 for n in (1, 2, 4, 8, 28, 50) for tokens in (4, 256, 1024, 4096, 16384)]
    rng = np.random.default_rng(0)
    return np.concatenate([np.linspace(0, 1, 1001), rng.random(2000), *schedules]).astype(np.float32)


def test_float32_timestep_embedding_matches_diffusers(tiny_diffusers):
    t = _times()
    theirs = _diffusers_time_features(tiny_diffusers, t, torch.float32)
    ours = np.asarray(jax.jit(timestep_embedding, static_argnums=1)(jnp.asarray(t), 256))
    err = float(np.max(np.abs(ours - theirs)))
    shift = _argument_shift(1000 * t)
    print(f"float32 time features: max|Δ| = {err:.2e} (table shift here {shift:.1e}), "
          f"{np.count_nonzero(ours != theirs)} of {ours.size} differ")
    assert ours.shape == theirs.shape and err <= SIN_COS_ULP + shift


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bfloat16_timestep_embedding_rounds_1000t_like_diffusers(tiny_diffusers, jit):
    """In bf16 diffusers computes timestep.to(bf16) * 1000 in bf16 (0.6 → 0.6015625 → 601.5625 → 600);
    under jit too, where XLA would drop a plain bf16 round trip."""
    t = np.concatenate([_times(), flow_schedule.model_timesteps(flow_schedule.sigmas(4, 4096), quantize_bf16=True)])
    theirs = _diffusers_time_features(tiny_diffusers, t, torch.bfloat16)
    embed = functools.partial(timestep_embedding, dim=256, dtype=jnp.bfloat16)
    ours = np.asarray((jax.jit(embed) if jit else embed)(jnp.asarray(t)))
    scaled = (torch.from_numpy(t).to(torch.bfloat16) * 1000).float().numpy()
    assert float(np.max(np.abs(ours - theirs))) <= SIN_COS_ULP + _argument_shift(scaled)


def test_bfloat16_pipeline_time_features_match_diffusers(tiny_diffusers):
    """The whole bf16 chain under jit: sigma -> denoise.model_time -> embedding, against the Klein
    pipeline's `t.to(bf16) / 1000` and the transformer's `timestep.to(bf16) * 1000` (the double
    rounding that gives 768, not BFL's 764, at 1024², 4 steps)."""
    from flowgen.engine.sampling.loop import model_time

    sigma = np.concatenate([flow_schedule.sigmas(n, tokens)[:-1]
                            for n in (1, 2, 4, 8, 28, 50) for tokens in (4, 256, 1024, 4096, 16384)])
    fed = (torch.from_numpy(sigma) * 1000).to(torch.bfloat16) / 1000
    theirs = _diffusers_time_features(tiny_diffusers, fed.float().numpy(), torch.bfloat16)
    embed = jax.jit(lambda s: timestep_embedding(model_time(s, True), 256, jnp.bfloat16))
    scaled = (fed.to(torch.bfloat16) * 1000).float().numpy()
    assert float(np.max(np.abs(np.asarray(embed(jnp.asarray(sigma))) - theirs))) <= SIN_COS_ULP + _argument_shift(scaled)


# ---- the text encoder's RoPE ---------------------------------------------------------------------


def _qwen3(**sizes):
    from transformers import Qwen3Config

    return Qwen3Config(**{"vocab_size": 64, "num_hidden_layers": 1, "intermediate_size": 64, **sizes})


QWEN3_CONFIGS = {
    "Qwen3-8B": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6),
    "Qwen3-4B": dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6),
    "tiny": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6),
    "tiny, linear x2": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
}


@pytest.mark.parametrize("name", list(QWEN3_CONFIGS))
def test_qwen3_inv_freq_is_transformers_to_the_bit(name):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    hf = _qwen3(**QWEN3_CONFIGS[name])
    ours = _inv_freq(Qwen3EncoderConfig.from_hf(hf.to_dict()))
    np.testing.assert_array_equal(bits(ours), bits(Qwen3RotaryEmbedding(hf).inv_freq))


def test_qwen3_rope_tables_match_transformers_within_an_ulp():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    hf = _qwen3(**QWEN3_CONFIGS["Qwen3-8B"])
    length = 512
    want_cos, want_sin = Qwen3RotaryEmbedding(hf)(torch.zeros(1, length, 128), torch.arange(length)[None])
    cos, sin = _rope_tables(Qwen3EncoderConfig.from_hf(hf.to_dict()), length, jnp.float32)
    assert float(np.max(np.abs(np.asarray(cos) - want_cos[0].numpy()))) <= SIN_COS_ULP
    assert float(np.max(np.abs(np.asarray(sin) - want_sin[0].numpy()))) <= SIN_COS_ULP


# ---- the DiT's RoPE ------------------------------------------------------------------------------


def test_dit_rope_tables_are_diffusers_to_the_bit():
    """Real 4 x 32 axes, theta 2000, over 512 text tokens, a 128x128 image and four references."""
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    axes = (32, 32, 32, 32)
    all_ids = np.concatenate([ids.text_ids(512), ids.image_ids(128, 128),
                              ids.reference_ids([(64, 64), (32, 96), (128, 128), (16, 16)])])
    want_cos, want_sin = Flux2PosEmbed(theta=2000, axes_dim=list(axes))(torch.from_numpy(all_ids))
    cos, sin = rope_tables(all_ids, axes, 2000)
    np.testing.assert_array_equal(bits(cos), bits(want_cos.numpy()[:, ::2]))  # diffusers repeats each entry twice
    np.testing.assert_array_equal(bits(sin), bits(want_sin.numpy()[:, ::2]))


# ---- the VAE -------------------------------------------------------------------------------------


def test_vae_eps_match_diffusers():
    from diffusers import AutoencoderKLFlux2

    from flowgen.engine.vae.blocks import GROUP_NORM_EPS
    from flowgen.engine.vae.config import VAEConfig
    from tests.engine.fixtures_pipeline import VAE

    model = AutoencoderKLFlux2(**VAE)
    assert VAEConfig().batch_norm_eps == model.config.batch_norm_eps == model.bn.eps
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == GROUP_NORM_EPS for m in norms)


def test_vae_batch_norm_stats_match_the_pipelines(tmp_path):
    from diffusers import AutoencoderKLFlux2

    from flowgen.engine.vae.model import _bn_mean_std, load_vae
    from tests.engine.fixtures_pipeline import VAE, sharpen_vae_

    model = AutoencoderKLFlux2(**VAE).eval()
    sharpen_vae_(model)
    model.save_pretrained(tmp_path)
    ours = load_vae(tmp_path)
    mean, std = _bn_mean_std(ours.params, ours.config)
    # Flux2KleinPipeline._encode_vae_image / the decode branch of __call__
    want_mean = model.bn.running_mean.view(1, -1, 1, 1)
    want_std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
    np.testing.assert_array_equal(bits(mean), bits(want_mean.numpy()))
    # The float32 sum var + eps is the same; torch's float32 sqrt is not correctly rounded (1 ulp off
    # for ~0.7% of inputs, here 2 of 128), XLA's is: equal to the float64 root rounded once.
    exact = np.sqrt((model.bn.running_var + model.config.batch_norm_eps).numpy().astype(np.float64))
    np.testing.assert_array_equal(bits(std).ravel(), bits(exact.astype(np.float32)))
    np.testing.assert_array_max_ulp(np.asarray(std), want_std.numpy(), maxulp=1)


# ---- the flow schedule ---------------------------------------------------------------------------


def test_schedule_sweep_is_diffusers_to_the_bit():
    """sigmas and the fed timesteps over a sweep of token counts (both mu branches) and step counts."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    config = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    for tokens in [*range(1, 8200, 97), 4300, 4301]:
        for steps in (1, 2, 3, 4, 7, 28, 50):
            scheduler = FlowMatchEulerDiscreteScheduler(**config)
            mu = compute_empirical_mu(image_seq_len=tokens, num_steps=steps)
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            assert flow_schedule.empirical_mu(tokens, steps) == mu
            ours = flow_schedule.sigmas(steps, tokens)
            np.testing.assert_array_equal(bits(ours), bits(scheduler.sigmas.numpy()), err_msg=f"{tokens}, {steps}")
            fed = scheduler.timesteps / 1000  # the Klein pipelines' `timestep / 1000`, float32
            np.testing.assert_array_equal(bits(flow_schedule.model_timesteps(ours)), bits(fed.numpy()))
            fed_bf16 = (scheduler.timesteps.to(torch.bfloat16) / 1000).float()
            quantised = flow_schedule.model_timesteps(ours, quantize_bf16=True)
            np.testing.assert_array_equal(bits(quantised), bits(fed_bf16.numpy()))
