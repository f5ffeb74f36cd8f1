"""FLUX.2 [klein]'s text encoder: Qwen3 run up to the deepest layer Klein reads, in JAX.

Klein's prompt embedding is, per token, `hidden_states[9] ‖ [18] ‖ [27]` of Qwen3 (8B for the 9B
models), where `hidden_states[0]` is the token embedding and `[k]` the raw output of decoder layer
k (transformers swaps the *last* entry for the final-normed state; we do the same if asked for it).
So layers 28-36, the final norm and the LM head are never loaded, let alone run.

The math follows transformers' `modeling_qwen3.py`: pre-norm decoder layers, RMSNorm computed in
float32 and cast back before the weight multiply, grouped-query attention with RMSNorm on q and k
(over head_dim) before half-split ("rotate_half") RoPE, causal attention whose padded *keys* are
masked (padded query rows still attend to the real tokens, and the DiT reads those rows too),
softmax in float32, SiLU-gated MLP, position ids 0..T-1 including pads.

Layers are stacked on a leading axis and run with `lax.scan`, so compile time does not grow with
depth. The embedding table stays memory-mapped on the host and only the rows of the prompt tokens
are gathered: it is 1.2 GB of device memory for Qwen3-8B that the forward never needs whole.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from flowgen.engine.runtime import placement
from flowgen.engine.text import keys as qwen3_keys
from flowgen.engine.weights.safetensors_io import open_safetensors
from flowgen.errors import CheckpointError

KLEIN_LAYERS = (9, 18, 27)
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3EncoderConfig:
    """The Qwen3 hyper-parameters the encoder needs (from a transformers config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_linear_factor: float = 1.0  # "linear" rope scaling divides the frequencies by this

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_hf(cls, config: dict, source: str | Path = "config.json") -> Qwen3EncoderConfig:
        """Read a transformers Qwen3 config dict; CheckpointError (naming `source`) if it is not one."""
        if config.get("model_type") != "qwen3":
            raise CheckpointError(
                f"{source}: model_type is {config.get('model_type')!r}, expected 'qwen3' (a Qwen3 text encoder)"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (Qwen3 uses 'silu')")
        if config.get("attention_bias"):
            raise CheckpointError(f"{source}: attention_bias=true is not supported (Qwen3 has none)")
        if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
            raise CheckpointError(f"{source}: sliding-window attention is not supported")
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            theta, factor = _rope(config, source)
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_linear_factor=factor,
            )
        except KeyError as err:
            raise CheckpointError(f"{source}: Qwen3 config lacks {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: invalid Qwen3 config ({err})") from None


def _rope(config: dict, source) -> tuple[float, float]:
    """(theta, linear factor). transformers 5.x writes `rope_parameters: {rope_type, rope_theta, …}`;
    4.x wrote `rope_theta` at the top level and an optional `rope_scaling` dict."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rope.get("full_attention"), dict):  # per-layer-type form
        rope = rope["full_attention"]
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10_000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, 1.0
    if kind == "linear":
        return theta, float(rope["factor"])
    raise CheckpointError(f"{source}: rope type {kind!r} is not supported (allowed: default, linear)")


class TextEncoder:
    """Qwen3 hidden states of chosen layers, concatenated per token: `enc(ids, mask) -> (B, T, n·D)`."""

    def __init__(
        self,
        config: Qwen3EncoderConfig,
        layers: Sequence[int],
        embed_table: np.ndarray,
        stacked: dict[str, jax.Array],
        final_norm: jax.Array | None,
        dtype: str = "float32",
    ):
        """`embed_table` (V, D) host array; `stacked` the per-kind layer stacks of
        `qwen3_keys.LAYER_PARTS` for layers 1..max(layers); `final_norm` needed only if the last
        layer of the model is requested."""
        self.config = config
        self.layers = _check_layers(layers, config.num_layers)
        self.dtype = jnp.dtype(_DTYPES[dtype])
        self._embed_table = embed_table
        self._params = {"layers": stacked, "final_norm": final_norm}
        depth = max(self.layers)
        # slot[i] = where the output of layer i+1 goes; len(layers) is a scratch slot.
        slots = np.full((depth,), len(self.layers), dtype=np.int32)
        for slot, k in enumerate(self.layers):
            if k > 0:
                slots[k - 1] = slot
        self._slots = placement.to_device(slots)  # a transfer: jnp.asarray would compile a program
        # Static settings of the jitted forward; equal settings share one compiled executable.
        self._static = dict(
            config=config,
            embed_slot=self.layers.index(0) if 0 in self.layers else None,
            norm_slot=self.layers.index(config.num_layers) if config.num_layers in self.layers else None,
            num_outputs=len(self.layers),
            precision=jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else jax.lax.Precision.DEFAULT,
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def output_size(self) -> int:
        """Width of one token's embedding: len(layers) * hidden_size."""
        return len(self.layers) * self.config.hidden_size

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
        """`ids`, `mask`: int (B, T) with mask 1 for real tokens. Returns float32 (B, T, n·D)."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or np.shape(mask) != ids.shape:
            raise ValueError(f"ids and mask must both be (B, T); got {ids.shape} and {np.shape(mask)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self._embed_table.shape[0]):
            raise ValueError(f"token ids must lie in [0, {self._embed_table.shape[0]})")
        embeds = np.asarray(self._embed_table[ids.reshape(-1)], dtype=self.dtype).reshape(*ids.shape, -1)
        valid = np.asarray(mask, dtype=bool)  # host arrays go in as arguments of the program (no eager op)
        return _encode(self._params, embeds, valid, self._slots, **self._static)


def load_text_encoder(folder: str | Path, dtype: str = "float32", layers: Sequence[int] = KLEIN_LAYERS) -> TextEncoder:
    """Load a diffusers `text_encoder/` folder (Qwen3 config.json + safetensors, sharded or not).

    Reads only the embedding and decoder layers 1..max(layers) (plus the final norm if the model's
    last layer is requested). Raises CheckpointError naming the folder or file on any problem.
    """
    folder = Path(folder)
    if dtype not in _DTYPES:
        raise CheckpointError(f"text encoder dtype {dtype!r} is not supported (allowed: {', '.join(_DTYPES)})")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no config.json; expected a diffusers text_encoder/ folder")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file}: cannot read ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    config = Qwen3EncoderConfig.from_hf(raw, config_file)
    try:
        layers = _check_layers(layers, config.num_layers)
    except ValueError as err:
        raise CheckpointError(f"{config_file}: {err}") from None

    tensors = open_safetensors(folder)
    prefix = qwen3_keys.model_prefix(tensors)
    c = config
    shapes = qwen3_keys.part_shapes(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim)
    embed_key = prefix + qwen3_keys.EMBED_KEY
    qwen3_keys.check_tensor(tensors, embed_key, (c.vocab_size, c.hidden_size))
    np_dtype = np.dtype(_DTYPES[dtype])
    # on a mesh: replicated, from host memory (runtime/placement.py)
    stacked = qwen3_keys.load_stacked_layers(tensors, prefix, max(layers), shapes, np_dtype, placement.to_device)
    final_norm = None
    if c.num_layers in layers:
        norm_key = prefix + qwen3_keys.FINAL_NORM_KEY
        qwen3_keys.check_tensor(tensors, norm_key, (c.hidden_size,))
        final_norm = placement.to_device(np.asarray(tensors[norm_key], dtype=np_dtype))
    return TextEncoder(config, layers, tensors[embed_key], stacked, final_norm, dtype)


def _check_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    layers = tuple(int(k) for k in layers)
    if not layers or len(set(layers)) != len(layers) or not all(0 <= k <= num_layers for k in layers):
        raise ValueError(f"layers {layers} must be distinct hidden-state indices in 0..{num_layers}")
    return layers


# ---------------------------------------------------------------- the forward (pure functions)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # As transformers: normalise in float32, cast back, then multiply by the weight.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


# transformers' float32 RoPE inverse frequencies for head_dim 128, rope_theta 1e6 (Qwen3-4B and -8B,
# the released Klein text encoders): float32 bit patterns (big-endian hex) of torch 2.13 (CPU) evaluating
#   1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
# torch's float32 pow is not always correctly rounded: the formula in `_inv_freq` misses entry 37 by
# 1 ulp (3e-11), as XLA's float32 pow did (1.5e-8 rad of angle at position 511).
_QWEN3_INV_FREQ_128_HEX = (
    "3f8000003f4e4bad3f263de03f05f6ef3ed7e89b3eadfcff3e8c35043e61f8353e3618873e12bd913dec7fd63dbe94c6"
    "3d99940d3d7785133d47763f3d20bc1d3d0186e33cd0c1a83ca8398b3c8790083c5a7bf23c3010523c0de12d3be4aa46"
    "3bb8449c3b947dae3b6f520e3b40dac53b1b690d3afa78f03ac9d75c3aa2a6f73a83126f3a533f283a2a3b443a092e02"
    "39dd172539b229fb398f927239676492393a77533916432438f22ce238c327b5389d43a4387d75d4384c3fbe382497ab"
    "3804a2b237d5c44137ac431d378ad0ed375fba4f37344a0e371148e336ea273236bcb0c136980e023675107036457bab"
    "361f23e436003dec35ceaf7935a68e4c"
)


def _inv_freq(config: Qwen3EncoderConfig) -> np.ndarray:
    """transformers' float32 `1 / theta**(arange(0, hd, 2) / hd)`, then `/= factor` ("linear" scaling).

    Other sizes (tiny test models) round the power once from float64 and take the reciprocal in
    float32: torch's bits on all but 10 of 2040 entries over head_dim 8-256 and theta 2e3-1e7."""
    if (config.head_dim, config.rope_theta) == (128, 1e6):
        inv_freq = np.frombuffer(bytes.fromhex(_QWEN3_INV_FREQ_128_HEX), ">u4").astype(np.uint32).view(np.float32)
    else:
        exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim)
        inv_freq = np.float32(1.0) / (config.rope_theta ** exponents.astype(np.float64)).astype(np.float32)
    return inv_freq / np.float32(config.rope_linear_factor)


def _rope_tables(config: Qwen3EncoderConfig, length: int, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (T, head_dim): frequencies repeated for both halves (rotate_half layout)."""
    inv_freq = jnp.asarray(_inv_freq(config))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [T, hd]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x: [B, T, heads, hd]; rotate_half pairs dim i with dim i + hd/2.
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _attention(h, p, cos, sin, bias, config: Qwen3EncoderConfig, precision):
    """Self-attention of one layer. h: [B, T, D]; bias: [B, 1, G·T, S] additive mask (0 or float32 min)."""
    c = config
    batch, length, _ = h.shape
    groups = c.num_heads // c.num_kv_heads
    qkv = jnp.einsum("btd,od->bto", h, p["qkv"], precision=precision)
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    q = qkv[..., :q_size].reshape(batch, length, c.num_heads, c.head_dim)
    k = qkv[..., q_size : q_size + kv_size].reshape(batch, length, c.num_kv_heads, c.head_dim)
    v = qkv[..., q_size + kv_size :].reshape(batch, length, c.num_kv_heads, c.head_dim)
    q = _apply_rope(_rms_norm(q, p["q_norm"], c.rms_norm_eps), cos, sin)
    k = _apply_rope(_rms_norm(k, p["k_norm"], c.rms_norm_eps), cos, sin)
    # Query head n uses kv head n // groups (transformers' repeat_kv). The `groups` query heads of a
    # kv head are stacked along the query axis, so each kv head is one (G·T, S) score matmul and the
    # scores never need a transpose (the masked `where` over a transposed layout was ~1/4 of a layer).
    q = q.reshape(batch, length, c.num_kv_heads, groups, c.head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, c.num_kv_heads, groups * length, c.head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv, S, hd]
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, precision=precision, preferred_element_type=jnp.float32)
    scores = scores * (c.head_dim**-0.5) + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(h.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", weights, v, precision=precision)  # [B, kv, G·T, hd]
    out = out.reshape(batch, c.num_kv_heads, groups, length, c.head_dim).transpose(0, 3, 1, 2, 4)
    return jnp.einsum("bti,oi->bto", out.reshape(batch, length, q_size), p["o_proj"], precision=precision)


def _attention_bias(mask: jax.Array, groups: int) -> jax.Array:
    """[B, T] key mask -> additive [B, 1, G·T, S] bias: causal and padded keys get float32 min.

    Adding float32 min (instead of transformers' `where(allowed, s, min)`) gives the same softmax:
    min + s rounds to min for |s| << 1e38, and a row with every key masked is uniform in both.
    """
    length = mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    allowed = causal[None] & mask[:, None, :]  # [B, T, S]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    return jnp.tile(bias, (1, groups, 1))[:, None]  # query index g·T + t


def _mlp(h, p, config: Qwen3EncoderConfig, precision):
    gate_up = jnp.einsum("btd,od->bto", h, p["gate_up"], precision=precision)
    gate, up = jnp.split(gate_up, [config.intermediate_size], axis=-1)
    return jnp.einsum("bti,oi->bto", jax.nn.silu(gate) * up, p["down"], precision=precision)


@functools.partial(jax.jit, static_argnames=("config", "embed_slot", "norm_slot", "num_outputs", "precision"))
def _encode(params, embeds, mask, slots, *, config, embed_slot, norm_slot, num_outputs, precision):
    """embeds [B, T, D] (dtype), mask [B, T] bool, slots [depth] int32 -> float32 [B, T, n·D]."""
    c = config
    batch, length, hidden = embeds.shape
    cos, sin = _rope_tables(c, length, embeds.dtype)
    bias = _attention_bias(mask, c.num_heads // c.num_kv_heads)
    collected = jnp.zeros((num_outputs + 1, batch, length, hidden), embeds.dtype)  # +1: scratch slot
    if embed_slot is not None:
        collected = collected.at[embed_slot].set(embeds)

    def layer(carry, xs):
        h, collected = carry
        p, slot = xs
        h = h + _attention(_rms_norm(h, p["attn_norm"], c.rms_norm_eps), p, cos, sin, bias, c, precision)
        h = h + _mlp(_rms_norm(h, p["mlp_norm"], c.rms_norm_eps), p, c, precision)
        collected = jax.lax.dynamic_update_index_in_dim(collected, h, slot, axis=0)
        return (h, collected), None

    (h, collected), _ = jax.lax.scan(layer, (embeds, collected), (params["layers"], slots))
    if norm_slot is not None:  # transformers reports the final-normed state as the last one
        collected = collected.at[norm_slot].set(_rms_norm(h, params["final_norm"], c.rms_norm_eps))
    out = jnp.moveaxis(collected[:num_outputs], 0, 2)  # [B, T, n, D]
    return out.reshape(batch, length, num_outputs * hidden).astype(jnp.float32)
