"""BFL single-file key table of the FLUX.2 DiT and its conversion into the stacked JAX params.

BFL key `double_blocks.3.img_mlp.0.weight` (torch (out, in)) lives in the param tree at
`double_blocks / img_mlp / 0 / kernel`, layer 3 of the stacked (layers, in, out) array.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def convert_bfl_tensors(config: Flux2Config, tensors: Mapping, abstract_params: dict, dtype) -> dict:
    """Fill a pure-dict param tree (shapes from `abstract_params`) from BFL tensors.

    Leaf by leaf: a stacked leaf is assembled in host memory layer by layer, then goes to the
    device(s) in one transfer, so host memory holds at most one stacked leaf beyond the growing
    params (on the CPU backend not even that: the aligned buffer becomes the device array). No
    program runs: inside `Placement.loading()` every array goes from host memory straight into its
    sharding on the mesh.
    """
    expected = validate_bfl_tensors(config, tensors)
    layers_of: dict[tuple, dict[int | None, str]] = {}  # leaf path -> layer -> BFL key
    for key in expected:
        path, layer = param_location(key)
        layers_of.setdefault(path, {})[layer] = key
    params: dict = {}
    for path, keys in layers_of.items():
        target = _abstract_leaf(abstract_params, path)
        leaf_dtype = target.dtype if path[-1] == "scale" else jnp.dtype(dtype)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if None in keys:
            node[path[-1]] = placement.to_device(_host_leaf(tensors, keys[None], path, leaf_dtype))
            continue
        stacked = placement.host_buffer(target.shape, leaf_dtype)
        for layer, key in keys.items():
            stacked[layer] = _host_leaf(tensors, key, path, leaf_dtype)
        node[path[-1]] = placement.to_device(stacked, stacked=True)
        del stacked
    return params


def _abstract_leaf(tree: dict, path: tuple):
    for part in path:
        tree = tree[part]
    return tree


def _host_leaf(tensors: Mapping, key: str, path: tuple, dtype) -> np.ndarray:
    """One BFL tensor in the param layout: kernels transposed to (in, out), cast to `dtype`."""
    host = np.asarray(tensors[key])
    return (host.T if path[-1] == "kernel" else host).astype(dtype, copy=False)
