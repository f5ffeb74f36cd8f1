"""Parity of the JAX FLUX.2 autoencoder with diffusers' AutoencoderKLFlux2 on the same random weights.

One tiny model (4 levels so the x8 factor holds, 1 resnet per level, 4 GroupNorm groups) with
sharpened weights and non-trivial BatchNorm statistics, saved with `save_pretrained`; the reference
computation is exactly what `Flux2KleinPipeline` does around `vae.encode` / `vae.decode`.
"""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKLFlux2
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

from flowgen.engine.vae import keys as vae_keys
from flowgen.engine.vae.config import VAEConfig
from flowgen.engine.vae.model import load_vae
from flowgen.errors import CheckpointError
from tests.engine.fixtures_pipeline import sharpen_vae_

TOL = 1e-4
H, W = 48, 80  # non-square, multiples of 16
TINY = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=8)


def _reference_encode(model: AutoencoderKLFlux2, images_nhwc: np.ndarray, normalise: bool = True) -> np.ndarray:
    """`Flux2KleinPipeline._encode_vae_image` without the pipeline object."""
    with torch.no_grad():
        x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
        z = model.encode(x).latent_dist.mode()
        z = Flux2KleinPipeline._patchify_latents(z)
        if normalise:
            mean = model.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
            z = (z - mean) / std
    return z.numpy()


def _reference_decode(model: AutoencoderKLFlux2, z: np.ndarray) -> np.ndarray:
    """The pipeline's decode path (inverse BN, unpatchify, vae.decode), returned NHWC, unclamped."""
    with torch.no_grad():
        t = torch.from_numpy(z)
        mean = model.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
        t = Flux2KleinPipeline._unpatchify_latents(t * std + mean)
        x = model.decode(t, return_dict=False)[0]
    return x.permute(0, 2, 3, 1).numpy()


def _quantise(x: np.ndarray) -> np.ndarray:
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoencoderKLFlux2(**TINY).eval()
    sharpen_vae_(model, seed=1)  # GroupNorms, biases, peaked attention, BN stats far from (0, 1)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    model.save_pretrained(folder)
    rng = np.random.default_rng(2)
    images = np.tanh(rng.normal(size=(2, H, W, 3)) * 1.5).astype(np.float32)
    token_channels = model.bn.running_mean.shape[0]
    latents = rng.normal(size=(2, token_channels, H // 16, W // 16)).astype(np.float32)
    return model, folder, images, latents


@pytest.fixture(scope="module")
def jax_vae(tiny):
    return load_vae(tiny[1])


@pytest.fixture(scope="module")
def bfl_file(tiny):
    """The tiny model's weights under BFL `ae.safetensors` names (attention projections as 1x1 convs)."""
    model, folder, _, _ = tiny
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    levels = len(TINY["block_out_channels"])
    bfl = {}
    for name, array in state.items():
        bfl_name = vae_keys.diffusers_to_bfl(name, levels)
        bfl[bfl_name] = array[:, :, None, None] if vae_keys.is_bfl_attention_conv(bfl_name) else array
    path = folder.parent / "ae.safetensors"
    safetensors.numpy.save_file(bfl, str(path))
    return path, bfl, state


# ---------------------------------------------------------------------------------------------
# parity


def test_encode_matches_diffusers(tiny, jax_vae):
    model, _, images, _ = tiny
    ref = _reference_encode(model, images)
    ours = np.asarray(jax_vae.encode(images))
    assert ours.shape == ref.shape == (2, jax_vae.config.token_channels, H // 16, W // 16)
    assert ours.dtype == np.float32
    # fixture sensitivity: the BN statistics and the input both move the reference a lot
    assert np.abs(ref - _reference_encode(model, images, normalise=False)).max() > 0.5
    assert np.abs(ref - _reference_encode(model, images[::-1].copy())).max() > 0.5
    err = np.abs(ours - ref).max()
    print(f"encode max abs err {err:.2e} (ref max {np.abs(ref).max():.2f})")
    assert err <= TOL


def test_attention_is_load_bearing(tiny):
    """A port that mis-orients the attention projections must fail: transposing to_q/to_k moves the
    reference far beyond the tolerance."""
    model, _, images, _ = tiny
    ref = _reference_encode(model, images)
    attn = model.encoder.mid_block.attentions[0]
    saved = attn.to_q.weight.detach().clone(), attn.to_k.weight.detach().clone()
    try:
        with torch.no_grad():
            attn.to_q.weight.copy_(saved[0].T)
            attn.to_k.weight.copy_(saved[1].T)
        assert np.abs(_reference_encode(model, images) - ref).max() > 100 * TOL
    finally:
        with torch.no_grad():
            attn.to_q.weight.copy_(saved[0])
            attn.to_k.weight.copy_(saved[1])


@pytest.mark.slow
def test_chunked_attention_equals_full_attention():
    """Large images attend over query blocks; the blocks (with a ragged last one) change nothing."""
    import jax.numpy as jnp

    from flowgen.engine.vae import blocks as vae_blocks

    rng = np.random.default_rng(3)
    c = 8
    p = {"group_norm": {"scale": jnp.asarray(rng.normal(size=c) + 1.0), "bias": jnp.asarray(rng.normal(size=c))}}
    for name in ("to_q", "to_k", "to_v"):
        p[name] = {"kernel": jnp.asarray(rng.normal(size=(c, c)) * 2.0), "bias": jnp.asarray(rng.normal(size=c))}
    p["to_out"] = {"0": {"kernel": jnp.asarray(rng.normal(size=(c, c))), "bias": jnp.asarray(rng.normal(size=c))}}
    x = jnp.asarray(rng.normal(size=(2, 6, 10, c)).astype(np.float32))
    full = vae_blocks.attention(p, x, groups=2, query_chunk=60)
    chunked = vae_blocks.attention(p, x, groups=2, query_chunk=16)  # 60 tokens -> 4 blocks, last one ragged
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=2e-5, atol=1e-5)  # matmul blocking only


def test_decode_matches_diffusers(tiny, jax_vae):
    model, _, _, latents = tiny
    ref = _reference_decode(model, latents)
    ours = np.asarray(jax_vae.decode_float(latents, clamp=False))
    assert ours.shape == ref.shape == (2, H, W, 3)
    assert np.abs(ref - _reference_decode(model, latents[::-1].copy())).max() > 0.5
    assert np.mean(np.abs(ref) < 1.0) > 0.3, "reference saturates; the uint8 check would be vacuous"
    err = np.abs(ours - ref).max()
    print(f"decode max abs err {err:.2e} (ref max {np.abs(ref).max():.2f})")
    assert err <= TOL
    np.testing.assert_array_equal(np.asarray(jax_vae.decode_float(latents)), np.clip(ours, -1, 1))


def test_uint8_decode_matches_quantised_reference(tiny, jax_vae):
    model, _, _, latents = tiny
    ref = _quantise(_reference_decode(model, latents))
    ours = np.asarray(jax_vae.decode(latents))
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    print(f"uint8 flips: {int((diff > 0).sum())} of {diff.size}")
    # only +-1 flips where the float lands within float32 noise of a .5 boundary (torch's own float32
    # decode of this sharpened model is ~4e-5 from a float64 one, ours ~5e-6)
    assert diff.max() <= 1
    assert (diff > 0).sum() <= diff.size // 1000


def test_pure_functions_trace_inside_a_callers_jit(tiny, jax_vae):
    """Teammates may fuse encode/decode into their own jit: the pure functions must trace there
    (lowered, not compiled, to keep the suite fast; the same functions are compared above)."""
    import jax

    from flowgen.engine.vae.model import decode_to_uint8, encode_images

    _, _, images, _ = tiny
    config = jax_vae.config

    def roundtrip(params, x):
        return decode_to_uint8(params, encode_images(params, x, config), config)

    jax.jit(roundtrip).lower(jax_vae.params, images)
    out = jax.eval_shape(roundtrip, jax_vae.params, images)
    assert out.shape == images.shape and out.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# BFL single-file layout


def test_bfl_mapping_agrees_with_diffusers_converter(tiny, bfl_file):
    """Our BFL names, fed to diffusers' generic LDM->diffusers VAE converter, give back the diffusers
    state dict. FLUX.2 only moves quant_conv / post_quant_conv into encoder / decoder (BFL
    autoencoder.py), which the generic converter expects at top level, and adds `bn.*` unchanged."""
    model, _, _, _ = tiny
    _, bfl, state = bfl_file
    ldm = {k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv."):
           torch.from_numpy(np.asarray(v)) for k, v in bfl.items()}
    converted = convert_ldm_vae_checkpoint(ldm, dict(model.config))
    expected = {k for k in state if not k.startswith("bn.")}
    assert set(converted) == expected
    for k in expected:
        np.testing.assert_array_equal(converted[k].numpy(), state[k], err_msg=k)


def test_bfl_single_file_loads_to_identical_outputs(tiny, jax_vae, bfl_file):
    _, folder, images, latents = tiny
    vae = load_vae(bfl_file[0], config=folder / "config.json")
    assert vae.config == jax_vae.config
    np.testing.assert_array_equal(np.asarray(vae.encode(images)), np.asarray(jax_vae.encode(images)))
    np.testing.assert_array_equal(np.asarray(vae.decode(latents)), np.asarray(jax_vae.decode(latents)))


def test_architecture_is_read_from_bfl_shapes(tiny, bfl_file):
    _, folder, _, _ = tiny
    path, bfl, _ = bfl_file
    levels = vae_keys.count_bfl_levels(set(bfl))
    shapes = {vae_keys.bfl_to_diffusers(k, levels): v.shape[:2] if vae_keys.is_bfl_attention_conv(k) else v.shape
              for k, v in bfl.items()}
    inferred = vae_keys.infer_config(shapes, base=VAEConfig(norm_num_groups=4))
    assert inferred == VAEConfig.from_diffusers(folder / "config.json")
    # without a config the released AE's 32 groups are assumed, which cannot divide 8 channels
    with pytest.raises(CheckpointError, match="ae.safetensors.*pass a config"):
        load_vae(path)


def test_real_flux2_ae_names_round_trip():
    """Spot-check the BFL table of flux2_klein.md §7.2 on the full-size config (names only)."""
    assert VAEConfig.from_diffusers(VAEConfig().to_diffusers()) == VAEConfig()
    names = vae_keys.diffusers_shapes(VAEConfig())
    bfl = {vae_keys.diffusers_to_bfl(n, 4) for n in names}
    assert {vae_keys.bfl_to_diffusers(n, 4) for n in bfl} == set(names)
    for key in ("encoder.quant_conv.weight", "decoder.post_quant_conv.weight",
                "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight", "encoder.down.2.downsample.conv.weight",
                "encoder.mid.attn_1.proj_out.weight", "decoder.mid.block_2.conv2.bias", "decoder.norm_out.weight"):
        assert key in bfl, key
    assert "decoder.up.0.upsample.conv.weight" not in bfl and "encoder.down.3.downsample.conv.weight" not in bfl
    assert names["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"] == (128, 256, 1, 1)
    assert sum(int(np.prod(s)) for s in names.values()) == pytest.approx(84.05e6, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# loading variants and errors


@pytest.mark.slow
def test_pipeline_root_and_bf16_weights(tiny, jax_vae, tmp_path):
    model, folder, images, _ = tiny
    root = tmp_path / "pipeline"
    shutil.copytree(folder, root / "vae")
    state = {k: v.numpy().astype(ml_dtypes.bfloat16) for k, v in model.state_dict().items()}
    safetensors.numpy.save_file(state, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    variant = {k: np.zeros_like(v) for k, v in state.items()}  # a diffusers fp16-style variant: ignored
    safetensors.numpy.save_file(variant, str(root / "vae" / "diffusion_pytorch_model.fp16.safetensors"))
    vae = load_vae(root)  # bf16 file, float32 compute
    kernel = vae.params["encoder"]["conv_in"]["kernel"]
    expected = state["encoder.conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0)
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(kernel), expected)
    # bfloat16 compute: runs, returns float32, stays close to the float32 model
    vae16 = load_vae(folder, dtype="bfloat16")
    assert vae16.dtype == np.dtype(ml_dtypes.bfloat16)
    z16, z32 = np.asarray(vae16.encode(images)), np.asarray(jax_vae.encode(images))
    assert z16.dtype == np.float32
    assert np.corrcoef(z16.ravel(), z32.ravel())[0, 1] > 0.99


def _write_variant(folder, dest, edit) -> None:
    shutil.copytree(folder, dest)
    file = dest / "diffusion_pytorch_model.safetensors"
    state = safetensors.numpy.load_file(str(file))
    edit(state)
    safetensors.numpy.save_file(state, str(file))


def test_missing_unexpected_and_misshaped_keys(tiny, tmp_path):
    _, folder, _, _ = tiny
    _write_variant(folder, tmp_path / "a", lambda s: s.pop("decoder.up_blocks.1.resnets.0.conv1.bias"))
    with pytest.raises(CheckpointError, match=r"a.*missing decoder\.up_blocks\.1\.resnets\.0\.conv1\.bias"):
        load_vae(tmp_path / "a")

    def extra_and_bad(s):
        s["encoder.extra.weight"] = np.zeros(3, np.float32)
        s["bn.running_var"] = np.ones(5, np.float32)

    _write_variant(folder, tmp_path / "b", extra_and_bad)
    with pytest.raises(CheckpointError) as err:
        load_vae(tmp_path / "b")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "b") in message
    assert "unexpected encoder.extra.weight" in message and "mis-shaped bn.running_var (5,)" in message


def test_bfl_missing_key_is_reported_in_bfl_names(tiny, bfl_file, tmp_path):
    _, folder, _, _ = tiny
    bfl = dict(bfl_file[1])
    del bfl["decoder.up.3.upsample.conv.weight"]
    path = tmp_path / "ae.safetensors"
    safetensors.numpy.save_file(bfl, str(path))
    with pytest.raises(CheckpointError, match=r"ae\.safetensors.*missing decoder\.up\.3\.upsample\.conv\.weight"):
        load_vae(path, config=folder / "config.json")


def test_garbage_and_foreign_files(tiny, tmp_path):
    _, folder, _, _ = tiny
    garbage = tmp_path / "ae.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=str(garbage)):
        load_vae(garbage)
    other = tmp_path / "other.safetensors"
    safetensors.numpy.save_file({"model.layers.0.weight": np.zeros((2, 2), np.float32)}, str(other))
    with pytest.raises(CheckpointError, match=r"other\.safetensors: not a FLUX\.2 autoencoder"):
        load_vae(other)
    with pytest.raises(CheckpointError, match="no such"):
        load_vae(tmp_path / "nowhere")
    flux1 = tmp_path / "flux1"
    shutil.copytree(folder, flux1)
    config = json.loads((flux1 / "config.json").read_text())
    (flux1 / "config.json").write_text(json.dumps(config | {"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="AutoencoderKLFlux2"):
        load_vae(flux1)
