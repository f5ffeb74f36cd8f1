"""Layers of the FLUX.2 autoencoder as pure functions of (params, NHWC activations).

Params are nested dicts whose paths are the diffusers module paths (`resnets/0/conv1/kernel`), so
the loader maps names by identity. Leaves: conv `kernel` (kh, kw, in, out), dense `kernel`
(in, out), norm `scale`/`bias`, every `bias` (out,). Activations stay in the weights' dtype;
GroupNorm statistics and the attention softmax are computed in float32.

Each layer is written in the form XLA:CPU runs fastest, with the same result (issue 22,
bench/RESULTS.md "VAE"): the upsample never materialises the repeated image, a conv's bias folds
into the GroupNorm after it, GroupNorm reduces per channel first, SiLU goes through tanh, 1x1 convs
are matmuls, the 3-channel image is zero-padded to 4 channels, and CPU attention runs in 512-row
query blocks. tests/engine/vae/test_vae_blocks.py pins each form to the plain operation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flowgen.engine.transformer import attention as attention_kernels

Params = dict  # nested {name: Params | jax.Array}

GROUP_NORM_EPS = 1e-6  # every GroupNorm of the AE (diffusers resnet_eps / BFL Normalize)
# XLA:CPU's convolution runs ~3x slower with 3 input channels (the image) than with 4; zero
# channels (and their zero kernel rows) add exact zeros.
CONV_CHANNEL_MULTIPLE = 4


def on_cpu() -> bool:
    """Whether traced code takes the CPU formulations (the engine's choice of kernels, see
    flowgen.engine.transformer.attention.current_path)."""
    return attention_kernels.current_path() == "cpu"


def conv(
    p: Params, x: jax.Array, *, stride: int = 1, padding: str | tuple = "same", add_bias: bool = True
) -> jax.Array:
    """2-D convolution on NHWC; 'same' pads k//2 on every side like PyTorch's padding=k//2.

    add_bias=False leaves the bias to the caller, which folds it into a following `group_norm`
    (its `offset`): XLA:CPU adds it in a separate full-size pass otherwise.
    """
    kernel = p["kernel"].astype(x.dtype)
    if kernel.shape[:2] == (1, 1) and stride == 1:  # a matmul over channels (XLA:CPU: 2-3x faster as a dot)
        y = jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0])
    else:
        if padding == "same":
            ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
            padding = ((ph, ph), (pw, pw))
        extra = -x.shape[-1] % CONV_CHANNEL_MULTIPLE
        if extra:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
            kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(stride, stride), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return y + p["bias"].astype(y.dtype) if add_bias else y


def group_norm(p: Params, x: jax.Array, groups: int, offset: jax.Array | None = None) -> jax.Array:
    """GroupNorm of x (+ a per-channel `offset`, e.g. the bias of the conv that made x) over
    (H, W, channels-in-group) with affine scale/bias; statistics in float32.

    Two passes (mean, then the mean square around it, as torch), each reducing over H and W per
    channel first and over the group's channels after: XLA:CPU reduces down the H, W axes of NHWC
    ~4x faster than over the interleaved axes of a (B, H, W, G, C/G) view. The offset and the
    normalisation fold into one per-channel multiply-add, applied in the same pass as what follows.
    """
    b, h, w, c = x.shape
    per_group = c // groups  # channels are group-major
    count = h * w * per_group
    xf = x.astype(jnp.float32)
    offset = jnp.zeros((c,), jnp.float32) if offset is None else offset.astype(jnp.float32)

    def per_channel(channel_sums: jax.Array) -> jax.Array:  # (B, C) sums -> (B, C) group means
        return jnp.repeat(channel_sums.reshape(b, groups, per_group).sum(-1) / count, per_group, axis=1)

    mean = per_channel(xf.sum(axis=(1, 2)) + h * w * offset)  # of x + offset
    centre = mean - offset  # x + offset - mean = x - centre
    var = per_channel(jnp.square(xf - centre[:, None, None, :]).sum(axis=(1, 2)))  # biased, as torch
    scale = jax.lax.rsqrt(var + GROUP_NORM_EPS) * p["scale"].astype(jnp.float32)
    shift = p["bias"].astype(jnp.float32) - centre * scale
    return (xf * scale[:, None, None, :] + shift[:, None, None, :]).astype(x.dtype)


def silu(x: jax.Array) -> jax.Array:
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x/2)) / 2: the same function, and XLA:CPU's tanh
    (a rational approximation) is cheaper than the exp and divide of its logistic (~0.5 vs ~1.2 ns
    per element; the GroupNorm + SiLU pass is ~20 % of the decoder)."""
    return x * (0.5 + 0.5 * jnp.tanh(0.5 * x))


def resnet(p: Params, x: jax.Array, groups: int) -> jax.Array:
    """norm -> silu -> conv3x3, twice, plus the (1x1-projected if widths differ) input."""
    h = conv(p["conv1"], silu(group_norm(p["norm1"], x, groups)), add_bias=False)
    h = conv(p["conv2"], silu(group_norm(p["norm2"], h, groups, offset=p["conv1"]["bias"])))
    shortcut = conv(p["conv_shortcut"], x) if "conv_shortcut" in p else x
    return shortcut + h


# Query rows per attention step: bounds the float32 logits to QUERY_CHUNK x H*W per image (1 GiB at
# 1024^2 input, where the mid block sees 128*128 tokens) instead of (H*W)^2 (16 GiB at 2048^2).
QUERY_CHUNK = 4096
# On CPU, cache-sized blocks (as the DiT's CPU attention, flowgen.engine.transformer.attention): at
# 64*64 tokens, 512-row blocks take ~0.6x the time of 4096-row ones.
CPU_QUERY_CHUNK = 512


def attention(p: Params, x: jax.Array, groups: int, query_chunk: int | None = None) -> jax.Array:
    """Single-head self-attention over all H*W positions with a residual (the mid-block AttnBlock)."""
    b, h, w, c = x.shape
    t = group_norm(p["group_norm"], x, groups).reshape(b, h * w, c)

    def dense(q: Params, v: jax.Array) -> jax.Array:
        return v @ q["kernel"].astype(v.dtype) + q["bias"].astype(v.dtype)

    q, k, v = dense(p["to_q"], t), dense(p["to_k"], t), dense(p["to_v"], t)
    out = _attend(q, k, v, query_chunk or (CPU_QUERY_CHUNK if on_cpu() else QUERY_CHUNK))
    return x + dense(p["to_out"]["0"], out).reshape(b, h, w, c)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
    """softmax(q k^T / sqrt(C)) v with float32 logits, computed over query blocks of `chunk` rows.

    1/sqrt(C) goes on q and the softmax's 1/sum on the (Q, C) output rather than the (Q, N) weights:
    one pass fewer over the logits."""
    b, n, c = q.shape
    q = q * jnp.asarray(c**-0.5, q.dtype)

    def block(qb: jax.Array) -> jax.Array:  # [B, Q, C] -> [B, Q, C]
        logits = jnp.einsum("bqc,bkc->bqk", qb, k, preferred_element_type=jnp.float32)
        weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        out = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)

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
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv — computed without the repeat.

    Output pixel (2i+a, 2j+b) sees input rows {i-1, i, i} (a=0) or {i, i, i+1} (a=1) through the
    kernel's three rows, and likewise for columns, so each of the four output phases is a 2x2 conv
    of the input with kernel taps summed accordingly (`_phase_kernels`). The four phases run as one
    2x2 conv with 4x the output channels over the input padded by one (phase (a, b) at output
    position (i+a, j+b)), then interleave: 16 instead of 36 multiply-adds per input pixel and
    channel pair, and the 4x-sized upsampled tensor is never written.
    """
    p = p["conv"]
    b, h, w, _ = x.shape
    kernel = _phase_kernels(p["kernel"].astype(jnp.float32)).astype(x.dtype)  # taps summed in float32
    cout = p["kernel"].shape[-1]
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )  # (B, h+1, w+1, 4*cout), phases (a, b) row-major
    phases = [y[:, a : a + h, c : c + w, (2 * a + c) * cout : (2 * a + c + 1) * cout] for a in (0, 1) for c in (0, 1)]
    out = jnp.stack(phases, axis=3).reshape(b, h, w, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, 2 * h, 2 * w, cout) + p["bias"].astype(x.dtype)


def _phase_kernels(kernel: jax.Array) -> jax.Array:
    """(3, 3, I, O) kernel after 2x nearest upsampling -> (2, 2, I, 4*O): the four output phases'
    2x2 kernels on the original grid, concatenated along O in (row phase, column phase) order."""

    def fold(k: jax.Array, axis: int, phase: int) -> jax.Array:  # 3 taps -> 2 along `axis`
        t0, t1, t2 = (jnp.take(k, i, axis=axis) for i in range(3))
        return jnp.stack([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], axis=axis)

    return jnp.concatenate([fold(fold(kernel, 0, a), 1, c) for a in (0, 1) for c in (0, 1)], axis=-1)
