"""Where arrays live on a device mesh (`mesh.py`): weights placed from host memory straight into
their sharding, a batch's rows split over "data", stacked block weights gathered a layer at a time.

    placement = Placement.build(data=4, model=2)        # the first 8 devices, axes ("data", "model")
    with placement.loading():                           # loaders' to_device() lands here
        transformer = load_transformer(...)
    x = placement.rows(x)                               # (B, ...) split on "data"

Weights: with model == 1 every leaf is replicated; with model > 1 the leaves of stacked layer
modules (leading layer axis) larger than SHARD_BYTES are split on "model" along their largest
other axis that `model` divides, the rest replicated. A loader hands each host (numpy) array to
`to_device`, which copies it from host memory into its NamedSharding: no array goes to device 0
first (moving device-0 arrays into a sharded layout compiles a resharding program per shape).
Outside `loading()`, `to_device` puts the array on the default device (as before meshes).

Layer gathering: traced code that runs a stacked module (`transformer.blocks.scan_layers`) asks
`gather_layer(state)`: inside `gathering(sharding)` (the compiled transformer enters it when its
weights are split) each layer's weights are constrained to the replicated sharding, so XLA
all-gathers one layer's weights where it is used and the activations are never split on "model".

Rows: inside `rows_split(axis)` (the sampling loop under `shard_map`, each device on its own rows)
`batch_max` takes a batch-wide maximum across the devices (the step caches decide per batch).

Many processes (multi-controller JAX, after `jax.distributed.initialize`): the mesh spans every
process's devices (`mesh_devices`, ordered by process, so each process's devices hold a contiguous
block of a batch's rows: `row_owners`). Every process makes the same engine calls in the same
order with the same host inputs (lockstep); `jax.device_put` of host data (or of a one-device
array holding the same value on every process) into a sharding over the global mesh fills each
process's own shards from its own copy, without a transfer: for a batch every process holds whole,
this is `jax.make_array_from_process_local_data` with the full batch as local data. Results leave
the devices through `to_host`: an array split over other processes' devices is gathered
(`process_allgather`) so every process holds the whole batch and the work after the engine call
(face passes, canaries) stays in lockstep too. A gather that fails (a peer process died) raises
`MeshPeerLost`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flowgen.engine.errors import MeshPeerLost
from flowgen.engine.runtime.mesh import MeshSpec, choose_model_size, resolved_text

SHARD_BYTES = 1 << 16  # stacked leaves below this stay replicated (norm scales, small kernels)

_STATE = threading.local()


@dataclass(frozen=True, eq=False)
class Placement:
    """A mesh and the rules for placing arrays on it (see module doc)."""

    mesh: Mesh

    @classmethod
    def build(cls, data: int, model: int, devices=None) -> Placement:
        devices = list(devices if devices is not None else mesh_devices())[: data * model]
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
    def processes(self) -> int:
        """How many processes' devices the mesh spans (1 but under multi-controller JAX)."""
        return len({device.process_index for device in self.mesh.devices.flat})

    @property
    def text(self) -> str:
        """As recorded: `data=4,model=1`, and ` over 2 processes` when it spans several."""
        text = resolved_text(self.data, self.model)
        return text if self.processes == 1 else f"{text} over {self.processes} processes"

    def record(self) -> dict[str, Any]:
        """What a result records of the mesh (its layout; not hashed)."""
        return {"data": self.data, "model": self.model, "devices": self.size, "processes": self.processes}

    def row_owners(self, rows: int) -> list[int]:
        """The process whose devices hold each row of a batch of `rows` rows (as the sampling loop
        lays them out: padded to a multiple of "data", each "data" slice a contiguous block; the
        first device of a slice names its process)."""
        per_slice = -(-rows // self.data)
        firsts = [int(self.mesh.devices[d, 0].process_index) for d in range(self.data)]
        return [firsts[row // per_slice] for row in range(rows)]

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
        """Loaders called inside place their arrays on this mesh (`to_device`)."""
        previous = getattr(_STATE, "loading", None)
        _STATE.loading = self
        try:
            yield
        finally:
            _STATE.loading = previous

    # ---- batches ------------------------------------------------------------------------------

    def rows(self, array, axis: int = 0):
        """`array` with axis `axis` (its rows) split over "data"."""
        return self.put(array, NamedSharding(self.mesh, row_spec(axis)))

    def everywhere(self, tree):
        """`tree`'s arrays replicated on every device of the mesh."""
        return self.put(tree, jax.tree.map(lambda _: self.replicated, tree))

    def put(self, tree, shardings):
        """`tree`'s arrays in `shardings` (a matching tree of shardings on this mesh), from wherever
        they are. Over several processes (every process holds the same values, see module doc): an
        array already on the whole mesh is resharded by a compiled identity, any other one is built
        from this process's copy (`make_array_from_callback`: each process fills its own shards)."""
        if self.processes == 1:
            return jax.device_put(tree, shardings)
        mesh_devices = set(self.mesh.devices.flat)

        def one(leaf, sharding):
            if isinstance(leaf, jax.Array) and set(leaf.sharding.device_set) == mesh_devices:
                return _reshard(leaf, sharding)
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed PRNG keys: their data
                return jax.random.wrap_key_data(_from_host(jax.random.key_data(leaf), sharding))
            return _from_host(leaf, sharding)

        return jax.tree.map(one, tree, shardings)


@functools.partial(jax.jit, static_argnums=1)
def _reshard_jit(array, sharding):
    return jax.lax.with_sharding_constraint(array, sharding)


def _reshard(array: jax.Array, sharding) -> jax.Array:
    """`array` (on the whole mesh) in `sharding`, by every process at once."""
    return array if array.sharding == sharding else _reshard_jit(array, sharding)


def _from_host(array, sharding) -> jax.Array:
    """A global array from this process's whole copy of it: each process fills its own shards."""
    host = np.asarray(array)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(array) -> np.ndarray:
    """`array` in host memory, whole: an array split over other processes' devices is gathered from
    them (every process holds every row after; see module doc). MeshPeerLost when a process is gone."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    try:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    except jax.errors.JaxRuntimeError as err:  # gloo / NCCL: "Connection closed by peer", ...
        raise MeshPeerLost(f"a process of the device mesh cannot be reached ({str(err).splitlines()[0]})") from None


def row_spec(axis: int = 0) -> P:
    """The PartitionSpec of an array whose axis `axis` holds a batch's rows."""
    return P(*([None] * axis), "data")


def loading_placement() -> Placement | None:
    """The placement a loader is inside (`Placement.loading`), or None."""
    return getattr(_STATE, "loading", None)


def to_device(host, dtype=None, *, stacked: bool = False) -> jax.Array:
    """A host array on the device(s): into its sharding on the loading mesh, else onto the default
    device. A transfer (`jax.device_put`), never a program: `jnp.asarray` of a host array compiles
    a `stage` program per shape (traced, lowered and looked up in the compile cache every run).
    stacked: the leaf of a stacked layer module (its axis 0 counts layers; may be split on "model")."""
    host = np.asarray(host) if dtype is None else np.asarray(host, dtype=dtype)
    placement = loading_placement()
    if placement is None:
        return jax.device_put(host)
    return jax.device_put(host, placement.weight_sharding(host.shape, host.dtype, stacked))


def host_buffer(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An empty host array aligned to 64 bytes, for a loader to fill (a stacked leaf, layer by
    layer) and hand to `to_device`: on the CPU backend `jax.device_put` adopts an aligned buffer as
    the device array (no copy, so the load's peak stays near one copy of the params); numpy's own
    large arrays are only 16-byte aligned and would be copied."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


_ALIGN = 64


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


def mesh_devices() -> list:
    """The devices a mesh is laid over: this process's, or under multi-controller JAX every
    process's, ordered by process (each process's devices a contiguous block of the mesh)."""
    if jax.process_count() == 1:
        return list(jax.local_devices())
    return sorted(jax.devices(), key=lambda device: (device.process_index, device.id))


def resolve_mesh(text: str | None, weight_bytes: int = 0, sharded_share: float = 1.0) -> tuple[int, int]:
    """(data, model) for `text` (`mesh.MeshSpec`) over the mesh's devices (`mesh_devices`); left out,
    `model` follows the device memory (`mesh.choose_model_size`). One-line EngineInputError when it does not fit."""
    devices = mesh_devices()
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
    return Placement.build(data, model, mesh_devices())


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
