"""Flax NNX building blocks of the FLUX.2 [klein] DiT (BFL layout and parameter names).

Weights follow BFL's single-file names with `.weight` -> `.kernel` (transposed to (in, out)).
Blocks of one kind are stored stacked: every parameter of `double_blocks` / `single_blocks`
has a leading layer axis, and the model runs them with `jax.lax.scan` (see `scan_layers`).
Activations are (B, N, H); attention runs in (B, heads, N, head_dim).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flowgen.engine.runtime import placement
from flowgen.engine.transformer.attention import attention
from flowgen.engine.transformer.rope import apply_rope

Rope = tuple[jnp.ndarray, jnp.ndarray]  # (cos, sin), each (N, head_dim / 2), float32
KV = tuple[jnp.ndarray, jnp.ndarray]  # post-RoPE K and V, each (B, heads, N, head_dim)


class Linear(nnx.Module):
    """Bias-free dense layer; `kernel` is (in, out), with an optional leading stack axis."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype, stack: tuple[int, ...] = ()):
        std = d_in**-0.5
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (*stack, d_in, d_out), dtype) * jnp.asarray(std, dtype)
        )

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return x @ self.kernel[...]


class SiLU(nnx.Module):
    """Parameter-free SiLU; keeps the index of BFL's `Sequential(SiLU, Linear)` (`adaLN_modulation.1`)."""

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return jax.nn.silu(x)


class SwiGLU(nnx.Module):
    """silu(first half) * second half — the first half is the gate."""

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return swiglu(x)


def swiglu(x: jnp.ndarray) -> jnp.ndarray:
    gate, up = jnp.split(x, 2, axis=-1)
    return jax.nn.silu(gate) * up


def layer_norm(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Parameter-free LayerNorm over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """(1 + scale) * LN(x) + shift, returned in x.dtype (feeds a matmul)."""
    out = layer_norm(x, eps) * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    """QK RMSNorm over head_dim, computed in float32; the scale is kept in float32."""

    def __init__(self, dim: int, eps: float, *, stack: tuple[int, ...] = ()):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((*stack, dim), jnp.float32))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


class QKNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, stack: tuple[int, ...] = ()):
        self.query_norm = RMSNorm(dim, eps, stack=stack)
        self.key_norm = RMSNorm(dim, eps, stack=stack)


def split_heads(qkv: jnp.ndarray, num_heads: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(B, N, 3·H) fused projection -> q, k, v each (B, heads, N, head_dim); layout [q | k | v]."""
    b, n, width = qkv.shape
    head_dim = width // (3 * num_heads)
    qkv = qkv.reshape(b, n, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(x: jnp.ndarray) -> jnp.ndarray:
    """(B, heads, N, head_dim) -> (B, N, heads·head_dim)."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def qk_prepare(qkv: jnp.ndarray, norm: QKNorm, rope: Rope, num_heads: int):
    """Split heads, QK-RMSNorm, then RoPE on q and k (the order the reference uses)."""
    q, k, v = split_heads(qkv, num_heads)
    q = apply_rope(norm.query_norm(q), *rope)
    k = apply_rope(norm.key_norm(k), *rope)
    return q, k, v


class SelfAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, *, rngs: nnx.Rngs, dtype, stack=()):
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, rngs=rngs, dtype=dtype, stack=stack)
        self.norm = QKNorm(dim // num_heads, eps, stack=stack)
        self.proj = Linear(dim, dim, rngs=rngs, dtype=dtype, stack=stack)

    def project(self, x_mod: jnp.ndarray, rope: Rope):
        return qk_prepare(self.qkv(x_mod), self.norm, rope, self.num_heads)


def _mlp(dim: int, hidden: int, *, rngs, dtype, stack) -> nnx.List:
    # BFL: Sequential(Linear(H, 2M), SiLU-GLU, Linear(M, H)) -> keys `.0` and `.2`
    return nnx.List(
        [
            Linear(dim, 2 * hidden, rngs=rngs, dtype=dtype, stack=stack),
            SwiGLU(),
            Linear(hidden, dim, rngs=rngs, dtype=dtype, stack=stack),
        ]
    )


def _run_mlp(mlp: nnx.List, x: jnp.ndarray) -> jnp.ndarray:
    return mlp[2](swiglu(mlp[0](x)))


class DoubleStreamBlock(nnx.Module):
    """Image and text streams with their own weights, joined in one attention."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, *, rngs, dtype, stack=()):
        self.eps = eps
        self.img_attn = SelfAttention(dim, num_heads, eps, rngs=rngs, dtype=dtype, stack=stack)
        self.img_mlp = _mlp(dim, mlp_hidden, rngs=rngs, dtype=dtype, stack=stack)
        self.txt_attn = SelfAttention(dim, num_heads, eps, rngs=rngs, dtype=dtype, stack=stack)
        self.txt_mlp = _mlp(dim, mlp_hidden, rngs=rngs, dtype=dtype, stack=stack)

    def attention_input(self, x, mod):
        """A stream's modulated input to attention, (1 + scale)·LN(x) + shift of its first modulation
        (the same in every layer: the modulation is global; TeaCache's signal is the image stream's)."""
        (shift, scale, _), _ = mod
        return modulate(x, shift, scale, self.eps)

    def _finish(self, x, attn_out, attn: SelfAttention, mlp, mod):
        (_, _, gate1), (shift2, scale2, gate2) = mod
        x = x + gate1 * attn.proj(merge_heads(attn_out))
        return x + gate2 * _run_mlp(mlp, modulate(x, shift2, scale2, self.eps))

    def __call__(
        self, img, txt, rope_img: Rope, rope_txt: Rope, mod_img, mod_txt, ref_kv: KV | None = None, key_lengths=None
    ):
        """Joint step over [txt, img] (+ cached reference K/V as extra keys). Returns (img, txt).

        key_lengths: (B,) valid keys per row over [txt, img, ref_kv] (padding at the tail)."""
        qi, ki, vi = self.img_attn.project(self.attention_input(img, mod_img), rope_img)
        qt, kt, vt = self.txt_attn.project(self.attention_input(txt, mod_txt), rope_txt)
        q = jnp.concatenate([qt, qi], axis=2)
        k, v = jnp.concatenate([kt, ki], axis=2), jnp.concatenate([vt, vi], axis=2)
        out = attention(q, k, v, ref_kv, key_lengths)  # a batch-1 ref_kv serves the whole batch without a copy
        n_txt = txt.shape[1]
        img = self._finish(img, out[:, :, n_txt:], self.img_attn, self.img_mlp, mod_img)
        txt = self._finish(txt, out[:, :, :n_txt], self.txt_attn, self.txt_mlp, mod_txt)
        return img, txt

    def reference(self, ref, rope_ref: Rope, mod_ref, key_lengths=None) -> tuple[jnp.ndarray, KV]:
        """Reference-only step: image-stream weights, self-attention among references. Returns (ref, (k, v))."""
        q, k, v = self.img_attn.project(self.attention_input(ref, mod_ref), rope_ref)
        ref = self._finish(ref, attention(q, k, v, None, key_lengths), self.img_attn, self.img_mlp, mod_ref)
        return ref, (k, v)


class SingleStreamBlock(nnx.Module):
    """Parallel block: fused linear1 -> [q | k | v | gate | up], fused linear2 on [attn | swiglu]."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, *, rngs, dtype, stack=()):
        self.eps, self.num_heads, self.dim = eps, num_heads, dim
        self.linear1 = Linear(dim, 3 * dim + 2 * mlp_hidden, rngs=rngs, dtype=dtype, stack=stack)
        self.linear2 = Linear(dim + mlp_hidden, dim, rngs=rngs, dtype=dtype, stack=stack)
        self.norm = QKNorm(dim // num_heads, eps, stack=stack)

    def _qkv_mlp(self, h, rope: Rope, mod):
        shift, scale, _ = mod
        fused = self.linear1(modulate(h, shift, scale, self.eps))
        q, k, v = qk_prepare(fused[..., : 3 * self.dim], self.norm, rope, self.num_heads)
        return q, k, v, fused[..., 3 * self.dim :]

    def _out(self, h, attn_out, mlp, mod):
        gate = mod[2]
        return h + gate * self.linear2(jnp.concatenate([merge_heads(attn_out), swiglu(mlp)], axis=-1))

    def __call__(self, h, rope: Rope, mod, ref_kv: KV | None = None, key_lengths=None):
        """Joint step over h = [txt, img] (+ cached reference K/V as extra keys)."""
        q, k, v, mlp = self._qkv_mlp(h, rope, mod)
        return self._out(h, attention(q, k, v, ref_kv, key_lengths), mlp, mod)

    def reference_kv(self, ref, rope_ref: Rope, mod_ref) -> KV:
        """Only the K/V of a reference-only step (enough for the last layer).

        Multiplies by the K/V columns of linear1 alone: 1/3 of its work (no q, gate or up).
        """
        shift, scale, _ = mod_ref
        return self._kv(modulate(ref, shift, scale, self.eps), rope_ref)

    def image_rows(self, h, rope: Rope, mod, n_txt: int, ref_kv: KV | None = None, key_lengths=None):
        """The step's output for the image rows h[:, n_txt:] alone (B, N, H), for a last block whose text
        rows are never read: every row still gives its keys and values, but only the image rows are
        queried and run through the MLP and linear2 (the text rows' share of linear1's q, gate and
        up columns, of attention and of linear2 is skipped)."""
        shift, scale, gate = mod
        x = modulate(h, shift, scale, self.eps)
        k, v = self._kv(x, rope)
        kernel = self.linear1.kernel[...]
        img = x[:, n_txt:]
        q = img @ kernel[..., : self.dim]
        b, n, _ = q.shape
        q = q.reshape(b, n, self.num_heads, -1).transpose(0, 2, 1, 3)
        cos, sin = (table[..., n_txt:, :] for table in rope)
        q = apply_rope(self.norm.query_norm(q), cos, sin)
        mlp = img @ kernel[..., 3 * self.dim :]
        return self._out(h[:, n_txt:], attention(q, k, v, ref_kv, key_lengths), mlp, (shift, scale, gate))

    def _kv(self, x_mod, rope: Rope) -> KV:
        """Post-RoPE keys and values of modulated rows, from linear1's K/V columns alone."""
        kv = x_mod @ self.linear1.kernel[..., self.dim : 3 * self.dim]
        b, n, _ = kv.shape
        kv = kv.reshape(b, n, 2, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        return apply_rope(self.norm.key_norm(kv[0]), *rope), kv[1]

    def reference(self, ref, rope_ref: Rope, mod_ref, key_lengths=None) -> tuple[jnp.ndarray, KV]:
        q, k, v, mlp = self._qkv_mlp(ref, rope_ref, mod_ref)
        return self._out(ref, attention(q, k, v, None, key_lengths), mlp, mod_ref), (k, v)


def scan_layers(stacked: nnx.Module, body: Callable, carry, per_layer=None):
    """Run `body(layer, carry, per_layer_slice) -> (carry, out)` over a stacked block module with lax.scan.
    Weights split over a mesh's "model" axis are gathered one layer at a time (`placement.gather_layer`)."""
    graphdef, state = nnx.split(stacked)

    def step(c, xs):
        layer_state, extra = xs
        return body(nnx.merge(graphdef, placement.gather_layer(layer_state)), c, extra)

    return jax.lax.scan(step, carry, (state, per_layer))
