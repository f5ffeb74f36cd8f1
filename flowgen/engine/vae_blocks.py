"""Layers of the FLUX.2 autoencoder as pure functions of (params, NHWC activations).

Params are nested dicts whose paths are the diffusers module paths (`resnets/0/conv1/kernel`), so
the loader maps names by identity. Leaves: conv `kernel` (kh, kw, in, out), dense `kernel`
(in, out), norm `scale`/`bias`, every `bias` (out,). Activations stay in the weights' dtype;
GroupNorm statistics and the attention softmax are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Params = dict  # nested {name: Params | jax.Array}

GROUP_NORM_EPS = 1e-6  # every GroupNorm of the AE (diffusers resnet_eps / BFL Normalize)


def conv(p: Params, x: jax.Array, *, stride: int = 1, padding: str | tuple = "same") -> jax.Array:
    """2-D convolution on NHWC; 'same' pads k//2 on every side like PyTorch's padding=k//2."""
    kernel = p["kernel"]
    if padding == "same":
        ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
        padding = ((ph, ph), (pw, pw))
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(stride, stride), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"].astype(x.dtype)


def group_norm(p: Params, x: jax.Array, groups: int) -> jax.Array:
    """GroupNorm over (H, W, channels-in-group) with affine scale/bias; statistics in float32."""
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)  # channels are group-major
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)  # biased, as torch
    y = ((xg - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)).reshape(b, h, w, c)
    y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def resnet(p: Params, x: jax.Array, groups: int) -> jax.Array:
    """norm -> silu -> conv3x3, twice, plus the (1x1-projected if widths differ) input."""
    h = conv(p["conv1"], jax.nn.silu(group_norm(p["norm1"], x, groups)))
    h = conv(p["conv2"], jax.nn.silu(group_norm(p["norm2"], h, groups)))
    shortcut = conv(p["conv_shortcut"], x) if "conv_shortcut" in p else x
    return shortcut + h


# Query rows per attention step: bounds the float32 logits to QUERY_CHUNK x H*W per image (1 GiB at
# 1024^2 input, where the mid block sees 128*128 tokens) instead of (H*W)^2 (16 GiB at 2048^2).
QUERY_CHUNK = 4096


def attention(p: Params, x: jax.Array, groups: int, query_chunk: int | None = None) -> jax.Array:
    """Single-head self-attention over all H*W positions with a residual (the mid-block AttnBlock)."""
    b, h, w, c = x.shape
    t = group_norm(p["group_norm"], x, groups).reshape(b, h * w, c)

    def dense(q: Params, v: jax.Array) -> jax.Array:
        return v @ q["kernel"].astype(v.dtype) + q["bias"].astype(v.dtype)

    q, k, v = dense(p["to_q"], t), dense(p["to_k"], t), dense(p["to_v"], t)
    out = _attend(q, k, v, query_chunk or QUERY_CHUNK)
    return x + dense(p["to_out"]["0"], out).reshape(b, h, w, c)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
    """softmax(q k^T / sqrt(C)) v with float32 logits, computed over query blocks of `chunk` rows."""
    b, n, c = q.shape

    def block(qb: jax.Array) -> jax.Array:  # [B, Q, C] -> [B, Q, C]
        logits = jnp.einsum("bqc,bkc->bqk", qb, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        return jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)

    if n <= chunk:
        return block(q)
    steps = -(-n // chunk)
    qp = jnp.pad(q, ((0, 0), (0, steps * chunk - n), (0, 0)))  # padded rows are computed, then dropped
    qs = qp.reshape(b, steps, chunk, c).transpose(1, 0, 2, 3)
    out = jax.lax.map(block, qs).transpose(1, 0, 2, 3).reshape(b, steps * chunk, c)
    return out[:, :n]


def mid_block(p: Params, x: jax.Array, groups: int) -> jax.Array:
    x = resnet(p["resnets"]["0"], x, groups)
    if "attentions" in p:
        x = attention(p["attentions"]["0"], x, groups)
    return resnet(p["resnets"]["1"], x, groups)


def downsample(p: Params, x: jax.Array) -> jax.Array:
    """Halve H and W: pad one zero row/column at the bottom/right, then a VALID stride-2 3x3 conv."""
    return conv(p["conv"], x, stride=2, padding=((0, 1), (0, 1)))


def upsample(p: Params, x: jax.Array) -> jax.Array:
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(p["conv"], x)
