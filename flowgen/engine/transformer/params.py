"""BFL single-file key table of the FLUX.2 DiT and its conversion into the stacked JAX params.

BFL key `double_blocks.3.img_mlp.0.weight` (torch (out, in)) lives in the param tree at
`double_blocks / img_mlp / 0 / kernel`, layer 3 of the stacked (layers, in, out) array.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.engine.runtime import placement
from flowgen.engine.transformer.config import Flux2Config
from flowgen.engine.transformer.keys import expected_bfl_shapes  # noqa: F401  (re-exported)
from flowgen.errors import CheckpointError

_STACKED = ("double_blocks", "single_blocks")


def param_location(key: str) -> tuple[tuple, int | None]:
    """BFL key -> (path in the param tree, layer index or None)."""
    parts = key.split(".")
    layer = None
    if parts[0] in _STACKED:
        layer = int(parts[1])
        parts = [parts[0], *parts[2:]]
    if parts[-1] == "weight":
        parts[-1] = "kernel"
    return tuple(int(p) if p.isdigit() else p for p in parts), layer


def _shape_of(tensors: Mapping, key: str) -> tuple[int, ...]:
    shape_fn = getattr(tensors, "shape", None)
    return tuple(shape_fn(key)) if callable(shape_fn) else tuple(np.shape(tensors[key]))


def _list(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
    return ", ".join(keys[:8]) + more


def validate_bfl_tensors(config: Flux2Config, tensors: Mapping) -> dict[str, tuple[int, ...]]:
    """Raise CheckpointError naming missing, unexpected or mis-shaped keys; return the expected table."""
    expected = expected_bfl_shapes(config)
    present = set(tensors.keys())
    missing, unexpected = set(expected) - present, present - set(expected)
    if missing:
        raise CheckpointError(f"transformer weights: missing {len(missing)} tensor(s): {_list(missing)}")
    if unexpected:
        raise CheckpointError(f"transformer weights: unexpected {len(unexpected)} tensor(s): {_list(unexpected)}")
    wrong = [
        f"{k} {_shape_of(tensors, k)} (expected {shape})"
        for k, shape in expected.items()
        if _shape_of(tensors, k) != shape
    ]
    if wrong:
        raise CheckpointError(f"transformer weights: wrong shape for {len(wrong)} tensor(s): {'; '.join(wrong[:4])}")
    return expected


def _set_layer(stacked: jax.Array, index: int, value: jax.Array) -> jax.Array:
    return stacked.at[index].set(value)


_set_layer_inplace = jax.jit(_set_layer, donate_argnums=0)  # index is traced: one compile per shape


def convert_bfl_tensors(config: Flux2Config, tensors: Mapping, abstract_params: dict, dtype) -> dict:
    """Fill a pure-dict param tree (shapes from `abstract_params`) from BFL tensors, one tensor at a time.

    Stacked arrays are allocated on device once and filled layer by layer in place (donated
    buffers), so host memory holds at most one source tensor beyond the growing params. Inside
    `Placement.loading()` every array is placed from host memory into its sharding on the mesh.
    """
    expected = validate_bfl_tensors(config, tensors)
    params: dict = {}

    def leaf_slot(path):
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        return node, path[-1]

    def abstract_leaf(path):
        node = abstract_params
        for p in path:
            node = node[p]
        return node

    for key in expected:
        path, layer = param_location(key)
        target = abstract_leaf(path)
        leaf_dtype = target.dtype if path[-1] == "scale" else jnp.dtype(dtype)
        host = np.asarray(tensors[key])
        host = (host.T if path[-1] == "kernel" else host).astype(leaf_dtype, copy=False)
        node, name = leaf_slot(path)
        if layer is None:
            node[name] = placement.to_device(host)
            continue
        if name not in node:  # on a mesh: in the leaf's sharding (placement.py), filled layer by layer
            node[name] = placement.zeros(target.shape, leaf_dtype, stacked=True)
        into = placement.layer_sharding(node[name])  # a layer goes from host straight to its shards
        value = jnp.asarray(host) if into is None else jax.device_put(host, into)
        node[name] = _set_layer_inplace(node[name], layer, value)
    return params
