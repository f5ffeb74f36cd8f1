"""Where arrays live on a device mesh (`mesh.py`): weights placed from host memory straight into
their sharding, a batch's rows split over "data", stacked block weights gathered a layer at a time.

    placement = Placement.build(data=4, model=2)        # the first 8 devices, axes ("data", "model")
    with placement.loading():                           # loaders' to_device() / zeros() land here
        transformer = load_transformer(...)
    x = placement.rows(x)                               # (B, ...) split on "data"

Weights: with model == 1 every leaf is replicated; with model > 1 the leaves of stacked layer
modules (leading layer axis) larger than SHARD_BYTES are split on "model" along their largest
other axis that `model` divides, the rest replicated. A loader hands each host (numpy) array to
`to_device`, which copies it from host memory into its NamedSharding: no array goes to device 0
first (moving device-0 arrays into a sharded layout compiles a resharding program per shape).
Outside `loading()`, `to_device` is `jnp.asarray` (one device, as before meshes).

Layer gathering: traced code that runs a stacked module (`transformer.blocks.scan_layers`) asks
`gather_layer(state)`: inside `gathering(sharding)` (the compiled transformer enters it when its
weights are split) each layer's weights are constrained to the replicated sharding, so XLA
all-gathers one layer's weights where it is used and the activations are never split on "model".

Rows: inside `rows_split(axis)` (the sampling loop under `shard_map`, each device on its own rows)
`batch_max` takes a batch-wide maximum across the devices (the step caches decide per batch).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flowgen.engine.runtime.mesh import MeshSpec, choose_model_size, resolved_text

SHARD_BYTES = 1 << 16  # stacked leaves below this stay replicated (norm scales, small kernels)

_STATE = threading.local()


@dataclass(frozen=True, eq=False)
class Placement:
    """A mesh and the rules for placing arrays on it (see module doc)."""

    mesh: Mesh

    @classmethod
    def build(cls, data: int, model: int, devices=None) -> Placement:
        devices = list(devices if devices is not None else jax.devices())[: data * model]
        return cls(Mesh(np.array(devices).reshape(data, model), ("data", "model")))

    @property
    def data(self) -> int:
        return int(self.mesh.shape["data"])

    @property
    def model(self) -> int:
        return int(self.mesh.shape["model"])

    @property
    def size(self) -> int:
        return self.data * self.model

    @property
    def text(self) -> str:
        return resolved_text(self.data, self.model)

    def record(self) -> dict[str, Any]:
        """What a result records of the mesh (its layout; not hashed)."""
        return {"data": self.data, "model": self.model, "devices": self.size}

    # ---- weights ------------------------------------------------------------------------------

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def weight_sharding(self, shape: tuple[int, ...], dtype, stacked: bool) -> NamedSharding:
        """A weight's sharding: replicated, or (model > 1, a stacked leaf of >= SHARD_BYTES) split
        on "model" along its largest non-layer axis that `model` divides."""
        if self.model == 1 or not stacked or len(shape) < 2:
            return self.replicated
        if int(np.prod(shape)) * jnp.dtype(dtype).itemsize < SHARD_BYTES:
            return self.replicated
        axes = [axis for axis in range(1, len(shape)) if shape[axis] % self.model == 0]
        if not axes:
            return self.replicated
        axis = max(axes, key=lambda a: (shape[a], -a))
        return NamedSharding(self.mesh, P(*([None] * axis), "model"))

    @property
    def shards_weights(self) -> bool:
        return self.model > 1

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Loaders called inside place their arrays on this mesh (`to_device`, `zeros`)."""
        previous = getattr(_STATE, "loading", None)
        _STATE.loading = self
        try:
            yield
        finally:
            _STATE.loading = previous

    # ---- batches ------------------------------------------------------------------------------

    def rows(self, array, axis: int = 0):
        """`array` with axis `axis` (its rows) split over "data"."""
        return jax.device_put(array, NamedSharding(self.mesh, row_spec(axis)))

    def everywhere(self, tree):
        """`tree`'s arrays replicated on every device of the mesh."""
        return jax.device_put(tree, self.replicated)


def row_spec(axis: int = 0) -> P:
    """The PartitionSpec of an array whose axis `axis` holds a batch's rows."""
    return P(*([None] * axis), "data")


def loading_placement() -> Placement | None:
    """The placement a loader is inside (`Placement.loading`), or None."""
    return getattr(_STATE, "loading", None)


def to_device(host, dtype=None, *, stacked: bool = False) -> jax.Array:
    """A host array on the device(s): into its sharding on the loading mesh, else `jnp.asarray`.
    stacked: the leaf of a stacked layer module (its axis 0 counts layers; may be split on "model")."""
    placement = loading_placement()
    if placement is None:
        return jnp.asarray(host, dtype=dtype)
    host = np.asarray(host) if dtype is None else np.asarray(host, dtype=dtype)
    return jax.device_put(host, placement.weight_sharding(host.shape, host.dtype, stacked))


def zeros(shape: tuple[int, ...], dtype, *, stacked: bool = False) -> jax.Array:
    """Zeros in the sharding `to_device` would give an array of this shape (filled in place later)."""
    placement = loading_placement()
    if placement is None:
        return jnp.zeros(shape, dtype)
    sharding = placement.weight_sharding(shape, dtype, stacked)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def layer_sharding(stacked: jax.Array) -> jax.sharding.Sharding | None:
    """The sharding of one layer of a stacked leaf placed by `to_device`/`zeros` (its spec without
    the layer axis), or None for an unplaced array."""
    sharding = getattr(stacked, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec)[1:]
    return NamedSharding(sharding.mesh, P(*spec))


# ---- inside traced code -----------------------------------------------------------------------


@contextlib.contextmanager
def gathering(sharding: Any) -> Iterator[None]:
    """While tracing inside: `gather_layer` constrains each layer's weights to `sharding` (a
    NamedSharding; None: a no-op)."""
    previous = getattr(_STATE, "gather", None)
    _STATE.gather = sharding
    try:
        yield
    finally:
        _STATE.gather = previous


def gather_layer(state):
    """One layer's weights as the layer uses them: all-gathered when the weights are split (see
    `gathering`), else unchanged."""
    sharding = getattr(_STATE, "gather", None)
    if sharding is None:
        return state
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), state)


@contextlib.contextmanager
def rows_split(axis_name: str | None) -> Iterator[None]:
    """While tracing inside: each device holds only its rows of the batch (shard_map over `axis_name`)."""
    previous = getattr(_STATE, "rows_axis", None)
    _STATE.rows_axis = axis_name
    try:
        yield
    finally:
        _STATE.rows_axis = previous


def batch_max(value: jax.Array) -> jax.Array:
    """`value` (a maximum over this device's rows) maximised over every device's rows."""
    axis = getattr(_STATE, "rows_axis", None)
    return value if axis is None else jax.lax.pmax(value, axis)


# ---- the mesh a pipeline loads onto -------------------------------------------------------------


def device_memory(device) -> int | None:
    """Bytes a device can allocate (accelerators), else None (CPU: host memory, not checked)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics
        return None
    return stats.get("bytes_limit") or None


def resolve_mesh(text: str | None, weight_bytes: int = 0, sharded_share: float = 1.0) -> tuple[int, int]:
    """(data, model) for `text` (`mesh.MeshSpec`) over this process's devices; left out, `model`
    follows the device memory (`mesh.choose_model_size`). One-line EngineInputError when it does not fit."""
    devices = jax.local_devices()
    spec = MeshSpec.parse(text)
    model = None
    if spec.data is None and spec.model is None:
        model = choose_model_size(len(devices), weight_bytes, device_memory(devices[0]), sharded_share)
    return spec.resolve(len(devices), model)


def mesh_for(text: str | None, source, dtype: str) -> tuple[int, int]:
    """(data, model) a pipeline of `source` (a model card, name or `ModelSource`) in `dtype` loads
    onto: `text` as given, or chosen from the weights' size and the device memory."""
    if MeshSpec.parse(text) != MeshSpec():
        return resolve_mesh(text)
    from flowgen.engine.source import ModelSource, resolve_source

    source = source if isinstance(source, ModelSource) else resolve_source(source)
    weights, sharded = weight_bytes(source, dtype)
    return resolve_mesh(text, weights, sharded / weights if weights else 1.0)


def placement_for(text: str | None, source, dtype: str) -> Placement | None:
    """The placement a pipeline loads onto (None: one device, arrays as before meshes)."""
    data, model = mesh_for(text, source, dtype)
    if data * model == 1:
        return None
    return Placement.build(data, model, jax.local_devices())


def weight_bytes(source, dtype: str) -> tuple[int, int]:
    """(all the pipeline's weights, the transformer's) in bytes once loaded in `dtype`, from the
    safetensors headers (nothing is read)."""
    from flowgen.engine.weights.safetensors_io import open_safetensors

    itemsize = jnp.dtype(dtype).itemsize

    def count(path) -> int:
        try:
            tensors = open_safetensors(path)
        except Exception:  # a component that is not a safetensors folder: not counted
            return 0
        return sum(int(np.prod(tensors.shape(name))) for name in tensors) * itemsize

    from flowgen.engine.weights.orbax_checkpoint import parameter_bytes

    transformer = count(source.transformer) or parameter_bytes(source.transformer, dtype)  # converted: its record
    return transformer + count(source.root / "text_encoder") + count(source.root / "vae"), transformer
