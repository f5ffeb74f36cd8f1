"""Qwen3 checkpoint keys -> flowgen's stacked text-encoder parameters.

A diffusers `text_encoder/` folder holds a transformers `Qwen3ForCausalLM` (`model.layers.{n}.…`,
`model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`); a bare `Qwen3Model` drops the
`model.` prefix. We read only the tensors of the layers we run, stack each kind over layers (one
leading axis, so the forward can `lax.scan` over them) and fuse the projections that share an input
(q|k|v, gate|up) into one matrix. Matrices keep torch's (out, in) layout; the forward contracts
the last axis. One kind is stacked at a time, so host memory peaks near one stacked tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import ml_dtypes
import numpy as np

from flowgen.engine.runtime.placement import host_buffer
from flowgen.engine.weights.safetensors_io import LazyTensors
from flowgen.errors import CheckpointError

DeviceArray = TypeVar("DeviceArray")  # what load_stacked_layers' `to_device` makes of a host array

# stacked name -> checkpoint suffixes (after "layers.{n}.") concatenated along the output axis.
LAYER_PARTS: dict[str, tuple[str, ...]] = {
    "attn_norm": ("input_layernorm.weight",),
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "q_norm": ("self_attn.q_norm.weight",),
    "k_norm": ("self_attn.k_norm.weight",),
    "o_proj": ("self_attn.o_proj.weight",),
    "mlp_norm": ("post_attention_layernorm.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
}
EMBED_KEY = "embed_tokens.weight"
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
FINAL_NORM_KEY = "norm.weight"


def model_prefix(tensors: LazyTensors) -> str:
    """'model.' for a Qwen3ForCausalLM checkpoint, '' for a bare Qwen3Model one."""
    for prefix in ("model.", ""):
        if prefix + EMBED_KEY in tensors:
            return prefix
    raise CheckpointError(f"{tensors.source}: no model.embed_tokens.weight; not a Qwen3 checkpoint")


def part_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple]:
    """Expected (out, in) shape of every checkpoint suffix in LAYER_PARTS."""
    return {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.q_norm.weight": (head_dim,),
        "self_attn.k_norm.weight": (head_dim,),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }


def check_tensor(tensors: LazyTensors, key: str, shape: tuple) -> None:
    """Raise CheckpointError naming the file if `key` is absent, mis-shaped or quantised."""
    if key not in tensors:
        raise CheckpointError(f"{tensors.source}: tensor {key!r} is missing")
    if tuple(tensors.shape(key)) != tuple(shape):
        raise CheckpointError(
            f"{tensors.file_of(key)}: tensor {key!r} has shape {tuple(tensors.shape(key))}, "
            f"config implies {tuple(shape)}"
        )
    if tensors.dtype(key) not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"{tensors.file_of(key)}: tensor {key!r} is {tensors.dtype(key)}; "
            "only float32/bfloat16/float16 weights are supported"
        )


def load_stacked_layers(
    tensors: LazyTensors,
    prefix: str,
    num_layers: int,
    shapes: Mapping[str, tuple],
    dtype: np.dtype,
    to_device: Callable[[np.ndarray], DeviceArray],
) -> dict[str, DeviceArray]:
    """Stack layers 0..num_layers-1 per LAYER_PARTS kind, cast to `dtype`, hand each to `to_device`.

    Every needed key is checked before any data is read, so a broken checkpoint fails fast.
    """
    for n in range(num_layers):
        for parts in LAYER_PARTS.values():
            for part in parts:
                check_tensor(tensors, f"{prefix}layers.{n}.{part}", shapes[part])
    stacked: dict[str, DeviceArray] = {}
    for kind, parts in LAYER_PARTS.items():
        rows = [shapes[p][0] for p in parts]
        trailing = shapes[parts[0]][1:]
        host = host_buffer((num_layers, sum(rows), *trailing), dtype)  # aligned: the CPU device adopts it
        for n in range(num_layers):
            start = 0
            for part, count in zip(parts, rows):
                host[n, start : start + count] = tensors[f"{prefix}layers.{n}.{part}"]
                start += count
        stacked[kind] = to_device(host)
        del host
    return stacked
