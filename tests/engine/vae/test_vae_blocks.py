"""The VAE's CPU formulations against the plain operations they replace (float64 torch references).

Each layer of `flowgen.engine.vae.blocks` computes its operation in a form XLA:CPU runs well: the
upsample never materialises the repeated image, GroupNorm folds a conv bias into its statistics,
3-channel convs are zero-padded to 4 channels, 1x1 convs are matmuls, SiLU goes through tanh, and
attention runs in 512-row query blocks. These tests pin each form to the textbook operation on
awkward shapes (odd sizes, ragged blocks, large means); the end-to-end parity with diffusers is
tests/engine/vae/test_vae_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowgen.engine.vae import blocks as vae_blocks

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same numbers whichever tests run before it."""
    global RNG
    RNG = np.random.default_rng(0)


def _array(*shape, scale=1.0, shift=0.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale + shift).astype(np.float32)


def _conv_params(kh: int, cin: int, cout: int) -> dict:
    return {"kernel": jnp.asarray(_array(kh, kh, cin, cout, scale=0.3)), "bias": jnp.asarray(_array(cout))}


def _torch_conv(x_nhwc: np.ndarray, p: dict, padding: int, *, bias: bool = True) -> np.ndarray:
    """float64 NCHW conv of NHWC data with an HWIO kernel, back to NHWC."""
    x = torch.from_numpy(np.asarray(x_nhwc, np.float64)).permute(0, 3, 1, 2)
    w = torch.from_numpy(np.asarray(p["kernel"], np.float64)).permute(3, 2, 0, 1)
    b = torch.from_numpy(np.asarray(p["bias"], np.float64)) if bias else None
    return F.conv2d(x, w, b, padding=padding).permute(0, 2, 3, 1).numpy()


def test_upsample_equals_nearest_repeat_then_conv():
    """The four-phase 2x2 conv equals nearest 2x upsampling followed by the 3x3 conv, borders included."""
    x = _array(2, 5, 7, 6)
    p = {"conv": _conv_params(3, 6, 4)}
    ours = np.asarray(jax.jit(vae_blocks.upsample)(p, jnp.asarray(x)))
    up = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)
    up = F.interpolate(up, scale_factor=2.0, mode="nearest").permute(0, 2, 3, 1).numpy()
    ref = _torch_conv(up, p["conv"], padding=1)
    assert ours.shape == ref.shape == (2, 10, 14, 4)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # a layout slip (phases swapped along one axis) would move every other row far beyond that
    swapped = ours.reshape(2, 5, 2, 14, 4)[:, :, ::-1].reshape(ours.shape)
    assert np.abs(swapped - ref).max() > 0.1


@pytest.mark.parametrize("offset_shift", [0.0, 40.0])
def test_group_norm_folds_an_offset_and_stays_two_pass(offset_shift):
    """group_norm(x, offset) == GroupNorm(x + offset), with means far from zero (where a one-pass
    E[x^2] - E[x]^2 variance would lose digits in float32)."""
    x = _array(2, 6, 5, 8, scale=3.0, shift=offset_shift)
    offset = _array(8, scale=5.0)
    p = {"scale": jnp.asarray(_array(8) + 1.0), "bias": jnp.asarray(_array(8))}
    ours = np.asarray(
        jax.jit(lambda p, x, o: vae_blocks.group_norm(p, x, 4, offset=o))(p, jnp.asarray(x), jnp.asarray(offset))
    )
    t = torch.from_numpy(x.astype(np.float64) + offset).permute(0, 3, 1, 2)
    ref = F.group_norm(
        t,
        4,
        torch.from_numpy(np.asarray(p["scale"], np.float64)),
        torch.from_numpy(np.asarray(p["bias"], np.float64)),
        eps=vae_blocks.GROUP_NORM_EPS,
    )
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=2e-5)
    plain = np.asarray(vae_blocks.group_norm(p, jnp.asarray(x + offset), 4))
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=2e-5)


def test_conv_paths_match_plain_convolution():
    """3 input channels (zero-padded to 4), a 1x1 conv (a matmul), a stride-2 conv, and add_bias=False."""
    image = _array(2, 9, 11, 3)
    p3 = _conv_params(3, 3, 5)
    np.testing.assert_allclose(
        np.asarray(vae_blocks.conv(p3, jnp.asarray(image))), _torch_conv(image, p3, 1), rtol=1e-5, atol=1e-5
    )
    x = _array(2, 9, 11, 6)
    p1 = _conv_params(1, 6, 4)
    np.testing.assert_allclose(
        np.asarray(vae_blocks.conv(p1, jnp.asarray(x))), _torch_conv(x, p1, 0), rtol=1e-5, atol=1e-5
    )
    p = _conv_params(3, 6, 4)
    no_bias = np.asarray(vae_blocks.conv(p, jnp.asarray(x), add_bias=False))
    np.testing.assert_allclose(no_bias, _torch_conv(x, p, 1, bias=False), rtol=1e-5, atol=1e-5)
    down = np.asarray(vae_blocks.downsample({"conv": p}, jnp.asarray(x)))
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    ref = torch.from_numpy(_torch_conv(padded, p, 0)).permute(0, 3, 1, 2)[:, :, ::2, ::2].permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(down, ref, rtol=1e-5, atol=1e-5)


def test_silu_is_x_times_sigmoid():
    """Within float32 rounding of x * sigmoid(x); below about -17 the tanh form gives 0 where silu
    is under 1e-6 in magnitude."""
    x = np.linspace(-30, 30, 10001, dtype=np.float32)
    ref = x.astype(np.float64) / (1.0 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(jax.jit(vae_blocks.silu)(jnp.asarray(x))), ref, rtol=2e-6, atol=2e-6)


def test_cpu_attention_in_query_blocks_matches_softmax_attention():
    """24x24 = 576 tokens: two 512-row blocks on CPU, the second ragged; against float64 SDPA."""
    assert vae_blocks.on_cpu() and vae_blocks.CPU_QUERY_CHUNK < 576
    c = 8
    p = {"group_norm": {"scale": jnp.asarray(_array(c) + 1.0), "bias": jnp.asarray(_array(c))}}
    for name in ("to_q", "to_k", "to_v"):
        p[name] = {"kernel": jnp.asarray(_array(c, c, scale=0.5)), "bias": jnp.asarray(_array(c))}  # logits span ~80
    p["to_out"] = {"0": {"kernel": jnp.asarray(_array(c, c)), "bias": jnp.asarray(_array(c))}}
    x = _array(2, 24, 24, c)
    ours = np.asarray(jax.jit(lambda p, x: vae_blocks.attention(p, x, groups=2))(p, jnp.asarray(x)))

    def f64(a):
        return torch.from_numpy(np.asarray(a, np.float64))

    t = (
        F.group_norm(
            f64(x).permute(0, 3, 1, 2),
            2,
            f64(p["group_norm"]["scale"]),
            f64(p["group_norm"]["bias"]),
            eps=vae_blocks.GROUP_NORM_EPS,
        )
        .permute(0, 2, 3, 1)
        .reshape(2, 576, c)
    )
    q, k, v = (t @ f64(p[n]["kernel"]) + f64(p[n]["bias"]) for n in ("to_q", "to_k", "to_v"))
    out = F.scaled_dot_product_attention(q, k, v) @ f64(p["to_out"]["0"]["kernel"]) + f64(p["to_out"]["0"]["bias"])
    ref = x + out.reshape(2, 24, 24, c).numpy()
    # float32 logits spanning ~80 carry ~1e-6 relative error into the softmax (the single-block
    # implementation before this one was off by 1.4e-6 of the largest output here)
    assert np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max()

