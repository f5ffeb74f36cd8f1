"""Merging LoRAs into the transformer's weights, one LoRA set per batch.

    weights = LoraWeights(transformer)
    params, key = weights.use([("brand.safetensors", 0.8), ("ink.safetensors", -0.5)])
    transformer.forward_fn(params, ...)     # the merged weights; key identifies them (cache keys)
    params, key = weights.use([])           # the base weights again, key ()

W' = W + Σ weight_i · ΔW_i, summed in float32 (on the device, matmuls at full precision) and cast
once to the weights' dtype. The unmerged base is kept, and each set is merged from it, never from
the previous merge, so switching sets repeats no rounding. Merged leaves share nothing with the
base (JAX arrays are immutable); untouched leaves are the base's own arrays. Memory: the base plus
one merged copy of every stacked weight a LoRA touches (about 2x the weights for a LoRA on every
attention and MLP projection).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from flowgen.engine.errors import EngineInputError
from flowgen.engine.lora.files import MAX_WEIGHT, LoraFile, Patch, read_lora
from flowgen.engine.transformer.keys import expected_bfl_shapes
from flowgen.engine.transformer.params import param_location
from flowgen.errors import CheckpointError

_HIGHEST = jax.lax.Precision.HIGHEST  # GPUs would otherwise multiply float32 in TF32


@jax.jit
def _lora_delta(up, down, scale):
    return jnp.matmul(up, down, precision=_HIGHEST) * scale


@jax.jit
def _lokr_delta(w1, w2, scale):
    return jnp.kron(w1, w2) * scale


def patch_delta(patch: Patch) -> jax.Array:
    """ΔW (rows, in) of one patch on the device, float32 (the numpy `Patch.delta` computes the same)."""
    a, b = (jnp.asarray(f, jnp.float32) for f in patch.factors)
    delta = (_lora_delta if patch.kind == "lora" else _lokr_delta)(a, b, jnp.float32(patch.scale))
    if patch.swap_halves:
        half = delta.shape[0] // 2
        delta = jnp.concatenate([delta[half:], delta[:half]])
    return delta


def _added(kernel, delta_t):
    return (kernel.astype(jnp.float32) + delta_t).astype(kernel.dtype)


def _added_to_layer(stacked, index, delta_t):
    return stacked.at[index].set(_added(stacked[index], delta_t))


_add = jax.jit(_added)
_add_to_layer = jax.jit(_added_to_layer)
_add_to_layer_inplace = jax.jit(_added_to_layer, donate_argnums=0)  # on the merged copy, never the base


def merged_params(base: nnx.State, config, adapters: Sequence[tuple[LoraFile, float]]) -> nnx.State:
    """`base` with Σ weight · ΔW of every adapter added (a new State; `base` is left as it is)."""
    expected = expected_bfl_shapes(config)
    by_target: dict[str, list[tuple[Patch, float]]] = defaultdict(list)
    for adapter, weight in adapters:
        for patch in adapter.patches:
            by_target[patch.target].append((patch, weight))
    pure = nnx.to_pure_dict(base)
    copied: set[tuple] = set()  # leaves already replaced by a merged copy (safe to update in place)
    for key, patches in by_target.items():  # one weight's float32 ΔW alive at a time
        delta = jnp.zeros(expected[key], jnp.float32)  # Σ weight · ΔW (out, in)
        for patch, weight in patches:
            start, stop = patch.rows(expected[key][0])
            delta = delta.at[start:stop].add(jnp.float32(weight) * patch_delta(patch))
        path, layer = param_location(key)
        node = pure
        for part in path[:-1]:
            node[part] = dict(node[part])  # copy the branch: `pure` must not alias the base's dicts
            node = node[part]
        leaf, delta_t = node[path[-1]], delta.T  # kernels are stored (in, out)
        if layer is None:
            node[path[-1]] = _add(leaf, delta_t)
        else:
            add = _add_to_layer_inplace if path in copied else _add_to_layer
            node[path[-1]] = add(leaf, layer, delta_t)
        copied.add(path)
    merged = jax.tree.map(lambda x: x, base)  # same structure and leaves; then swap the merged ones in
    nnx.replace_by_pure_dict(merged, pure)
    return merged


def check_loras(loras) -> list[tuple[Path, float]]:
    """Normalise `loras` (None or [(path, weight)] / [{"model": path, "weight": w}]) for generate()."""
    out = []
    for index, entry in enumerate(loras or ()):
        if isinstance(entry, dict):
            path, weight = entry.get("model"), entry.get("weight", 1.0)
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            path, weight = entry
        else:
            raise EngineInputError(f"loras[{index}]: give (path, weight) or {{'model': path, 'weight': w}}")
        if not isinstance(path, (str, os.PathLike)):
            raise EngineInputError(f"loras[{index}]: the LoRA must be a .safetensors path, got {type(path).__name__}")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or abs(weight) > MAX_WEIGHT
        ):
            raise EngineInputError(
                f"loras[{index}].weight: {weight!r} is not allowed; use a number from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}"
            )
        out.append((Path(path), float(weight)))
    return out


class LoraWeights:
    """The transformer's weights under the current LoRA set: merges on a change of set, else reuses."""

    def __init__(self, transformer, *, file_capacity: int = 8, counters=None):
        self.transformer = transformer
        self.base = transformer.params  # never modified
        self.params = self.base
        self.key: tuple = ()  # ((sha256, weight), ...) of the merged set; () = base
        self._files: dict[tuple, LoraFile] = {}  # (path, size, mtime) -> parsed file
        self._file_capacity = file_capacity
        self.counters = counters if counters is not None else {}

    def use(self, loras) -> tuple[nnx.State, tuple]:
        """(params, key) for the LoRA set `loras` (see check_loras); weight-0 entries change nothing."""
        adapters = [(self._read(path), weight) for path, weight in check_loras(loras) if weight != 0.0]
        key = tuple((adapter.sha256, weight) for adapter, weight in adapters)
        if key != self.key:
            self.params = self.base if not adapters else merged_params(self.base, self.transformer.config, adapters)
            self.key = key
            if adapters:
                self.counters["lora_merge"] = self.counters.get("lora_merge", 0) + 1
        return self.params, key

    def _read(self, path: Path) -> LoraFile:
        try:
            stat = path.stat()
        except OSError as err:
            raise CheckpointError(f"LoRA {path}: cannot read ({err.strerror or err})") from None
        file_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if file_key not in self._files:
            if len(self._files) >= self._file_capacity:
                self._files.pop(next(iter(self._files)))
            self._files[file_key] = read_lora(path, self.transformer.config)
        return self._files[file_key]
