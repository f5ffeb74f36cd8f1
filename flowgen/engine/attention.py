"""Scaled dot-product attention in (B, heads, N, head_dim) layout, picked per backend.

GPU: `jax.nn.dot_product_attention` (cuDNN flash attention for bf16/fp16, XLA otherwise).
CPU: XLA's default attention is ~5x slower than torch SDPA here, so we use plain matmuls in
(B, H, N, D) layout and process queries in blocks (keeps the score matrix cache-sized). The
softmax is unnormalised (exp(s - max)), and the 1/sum is applied to the (q, D) output instead of
the (q, k) probabilities; the 1/sqrt(D) scale goes on q (q·D values, not q·k). Together these
cut one full pass over the score matrix (≈ 15–25 % of CPU attention time, bench/RESULTS.md).
Softmax is always accumulated in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

CPU_QUERY_BLOCK = 512  # 128/256/512 measured: 512 best at 320–1408 queries, 8×64 heads


def _dense(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    total = weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / total).astype(q.dtype)


def _query_blocked(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, block: int) -> jnp.ndarray:
    b, h, n, d = q.shape
    num_blocks = -(-n // block)
    if num_blocks == 1:
        return _dense(q, k, v)
    size = -(-n // num_blocks)  # even blocks: least padding
    size = -(-size // 8) * 8
    pad = num_blocks * size - n
    if pad:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    blocks = q.reshape(b, h, num_blocks, size, d).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(lambda qb: _dense(qb, k, v), blocks)
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, num_blocks * size, d)
    return out[:, :, :n] if pad else out


def _gpu(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    # dot_product_attention wants (B, N, heads, D)
    qt, kt, vt = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    out = None
    if q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            out = jax.nn.dot_product_attention(qt, kt, vt, implementation="cudnn")
        except Exception:  # unsupported shape/driver: fall back to XLA's implementation
            out = None
    if out is None:
        out = jax.nn.dot_product_attention(qt, kt, vt, implementation="xla")
    return out.transpose(0, 2, 1, 3)


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """softmax(q·kᵀ/√d)·v for q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D)."""
    if jax.default_backend() == "gpu":
        return _gpu(q, k, v)
    return _query_blocked(q, k, v, CPU_QUERY_BLOCK)
