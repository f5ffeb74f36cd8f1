"""Scaled dot-product attention in (B, heads, N, head_dim) layout, picked per backend.

`attention(q, k, v, extra_kv, key_lengths)` attends over the keys [k, extra_k]; `extra_kv` (the
cached reference K/V of the KV model) may have batch 1 and then serves every image of the batch.
`key_lengths` (B,) counts each row's valid keys over [k, extra_k]: padding always sits at the tail
(padded reference tokens or K/V), and a masked key weighs exactly zero (its score is -inf before
the softmax), so padding changes no result beyond float32 summation order.

The kernel is chosen at trace time (`attention_path`, set per transformer from `RuntimeConfig`):
"cudnn" / "xla": `jax.nn.dot_product_attention` on the concatenated keys (cuDNN flash attention for
bf16/fp16 with an XLA fallback; TPUs take "xla"); "cpu": the blocked matmuls below.
CPU: XLA's default attention is ~5x slower than torch SDPA here, so we use plain matmuls, one image
at a time and in query blocks (keeps the score matrix cache-sized: a batch of 8 as one block was
2.3x slower per image than batch 1). The softmax is unnormalised (exp(s - max)), and the 1/sum is
applied to the (q, D) output instead of the (q, k) probabilities; the 1/sqrt(D) scale goes on q.
Extra keys are scored in a separate matmul and merged through the shared max and sum, so a batch-1
reference K/V is never broadcast or concatenated. Softmax is always accumulated in float32.
Each image runs the same arithmetic whatever its batch mates, so results do not depend on them.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import cast

import jax
import jax.numpy as jnp

CPU_QUERY_BLOCK = 512  # 128/256/512 measured: 512 best at 320–1408 queries, 8×64 heads

KeyParts = tuple[tuple[jnp.ndarray, jnp.ndarray], ...]  # ((k, v), ...), each (H, Nk_i, D)
Masks = tuple  # per part: None (all valid) or (Nk_i,) bool


def _dense(q: jnp.ndarray, parts: KeyParts, masks: Masks) -> jnp.ndarray:
    """One image: q (H, Nq, D) over the keys of all parts -> (H, Nq, D)."""
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    q = q * scale
    scores = [jnp.einsum("hqd,hkd->hqk", q, k, preferred_element_type=jnp.float32) for k, _ in parts]
    scores = [s if m is None else jnp.where(m[None, None, :], s, -jnp.inf) for s, m in zip(scores, masks)]
    peak = jax.lax.stop_gradient(_elementwise_max([s.max(axis=-1, keepdims=True) for s in scores]))
    weights = [jnp.exp(s - peak) for s in scores]
    # sum() of arrays is an array (typeshed also allows its int start, 0, for an empty input; parts is never empty)
    total = cast(jax.Array, sum(w.sum(axis=-1, keepdims=True) for w in weights))
    out = cast(
        jax.Array,
        sum(
            jnp.einsum("hqk,hkd->hqd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
            for w, (_, v) in zip(weights, parts)
        ),
    )
    return (out / total).astype(q.dtype)


def _elementwise_max(values: list[jnp.ndarray]) -> jnp.ndarray:
    out = values[0]
    for value in values[1:]:
        out = jnp.maximum(out, value)
    return out


def _query_blocked(q: jnp.ndarray, parts: KeyParts, masks: Masks, block: int) -> jnp.ndarray:
    """One image: q (H, N, D) in query blocks of at most `block` rows."""
    h, n, d = q.shape
    num_blocks = -(-n // block)
    if num_blocks == 1:
        return _dense(q, parts, masks)
    size = -(-n // num_blocks)  # even blocks: least padding
    size = -(-size // 8) * 8
    pad = num_blocks * size - n
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))
    blocks = q.reshape(h, num_blocks, size, d).transpose(1, 0, 2, 3)
    out = jax.lax.map(lambda qb: _dense(qb, parts, masks), blocks)
    out = out.transpose(1, 0, 2, 3).reshape(h, num_blocks * size, d)
    return out[:, :n] if pad else out


def _cpu(q, k, v, extra_kv, key_lengths=None) -> jnp.ndarray:
    """Image by image (lax.map over the batch); a batch-1 extra K/V is closed over, not mapped."""
    shared, per_image = None, None
    if extra_kv is not None:
        extra_kv = (extra_kv[0].astype(k.dtype), extra_kv[1].astype(v.dtype))
        if extra_kv[0].shape[0] == 1:
            shared = (extra_kv[0][0], extra_kv[1][0])
        else:
            per_image = extra_kv

    def one_image(args):
        qi, ki, vi, own_extra, length = args
        parts = ((ki, vi),) + tuple(p for p in (own_extra, shared) if p is not None)
        masks: Masks = (None,) * len(parts)
        if length is not None:  # the valid prefix of [k, extra_k], split per part
            offsets = [0, ki.shape[1]]
            masks = tuple(jnp.arange(kp.shape[1]) + offset < length for (kp, _), offset in zip(parts, offsets))
        return _query_blocked(qi, parts, masks, CPU_QUERY_BLOCK)

    if q.shape[0] == 1:
        own = None if per_image is None else (per_image[0][0], per_image[1][0])
        length = None if key_lengths is None else key_lengths[0]
        return one_image((q[0], k[0], v[0], own, length))[None]
    return jax.lax.map(one_image, (q, k, v, per_image, key_lengths))


def _gpu(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, key_lengths=None, *, cudnn: bool = True) -> jnp.ndarray:
    # dot_product_attention wants (B, N, heads, D); valid keys form a prefix, as its lengths assume
    qt, kt, vt = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    lengths = None if key_lengths is None else jnp.broadcast_to(key_lengths.astype(jnp.int32), (q.shape[0],))
    out = None
    if cudnn and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            out = jax.nn.dot_product_attention(qt, kt, vt, key_value_seq_lengths=lengths, implementation="cudnn")
        except Exception:  # unsupported shape/driver: fall back to XLA's implementation
            out = None
    if out is None:
        out = jax.nn.dot_product_attention(qt, kt, vt, key_value_seq_lengths=lengths, implementation="xla")
    return out.transpose(0, 2, 1, 3)


def concat_keys(k: jnp.ndarray, v: jnp.ndarray, extra_kv) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[k, extra_k] and [v, extra_v] along the key axis; a batch-1 extra broadcasts over the batch."""
    if extra_kv is None:
        return k, v
    k_extra, v_extra = extra_kv
    shape = (k.shape[0], *k_extra.shape[1:])
    k_extra = jnp.broadcast_to(k_extra.astype(k.dtype), shape)
    v_extra = jnp.broadcast_to(v_extra.astype(v.dtype), shape)
    return jnp.concatenate([k, k_extra], axis=2), jnp.concatenate([v, v_extra], axis=2)


def use_gpu_kernels() -> bool:
    """Whether traced code takes the GPU path by default (a function, so tests can run that path on CPU)."""
    return jax.default_backend() == "gpu"


PATHS = ("cpu", "xla", "cudnn")
_CHOSEN = threading.local()


@contextlib.contextmanager
def attention_path(path: str | None):
    """Trace the enclosed code with kernel `path` ("cpu", "xla", "cudnn"; None: per backend)."""
    if path is not None and path not in PATHS:
        raise ValueError(f"attention path {path!r}; allowed: {', '.join(PATHS)}")
    previous = getattr(_CHOSEN, "path", None)
    _CHOSEN.path = path
    try:
        yield
    finally:
        _CHOSEN.path = previous


def current_path() -> str:
    """The kernel traced code takes now: the chosen path, else cuDNN on GPU, XLA on TPU, else CPU."""
    chosen = getattr(_CHOSEN, "path", None)
    if chosen is not None:
        return chosen
    if use_gpu_kernels():
        return "cudnn"
    return "xla" if jax.default_backend() == "tpu" else "cpu"


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, extra_kv=None, key_lengths=None) -> jnp.ndarray:
    """softmax(q·kᵀ/√d)·v for q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D).

    extra_kv: optional (k, v), each (B or 1, H, Ne, D), attended as extra keys after k.
    key_lengths: optional (B,) int, valid keys per row over [k, extra_k] (the rest are masked).
    """
    path = current_path()
    if path != "cpu":
        return _gpu(q, *concat_keys(k, v, extra_kv), key_lengths, cudnn=path == "cudnn")
    return _cpu(q, k, v, extra_kv, key_lengths)
