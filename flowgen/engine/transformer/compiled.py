"""The FLUX.2 [klein] transformer, compiled: weights as runtime arguments of jitted pure functions.

    tr = CompiledTransformer.from_bfl_tensors(config, tensors, dtype="bfloat16")
    v = tr(x, x_ids, t, txt, txt_ids)                 # plain step (refs concatenated by the caller)
    kv = tr.reference_kv(ref, ref_ids)                # KV model: reference pre-pass, once per edit
    v = tr(x, x_ids, t, txt, txt_ids, ref_kv=kv)      # cached step (all steps, step 0 included)

`tr.forward_fn(params, x, rope_img, t, txt, rope_txt, ref_kv, key_lengths)` and
`tr.prepass_fn(params, ref, rope_ref, key_lengths)` are the jitted pure functions (callable inside
another jit; the unjitted `model.forward` / `model.reference_prepass` take the merged module instead);
RoPE tables come from `tr.rope(ids)`. `key_lengths` (B,) masks each row's padded tail (rows of
different reference lengths in one batch); None: every key is valid.

The attention kernel is part of the compiled program: `tr.use_attention("cudnn")` (or the
`attention=` argument) picks it; None means per backend (`attention.current_path`).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgen.engine.host_memory import keep_freed_buffers
from flowgen.engine.runtime import placement
from flowgen.engine.transformer.attention import PATHS, attention_path
from flowgen.engine.transformer.config import Flux2Config
from flowgen.engine.transformer.model import (
    Flux2Transformer,
    ReferenceKV,
    TransformerStages,
    forward,
    reference_prepass,
)
from flowgen.engine.transformer.params import convert_bfl_tensors, expected_bfl_shapes
from flowgen.engine.transformer.rope import rope_tables
from flowgen.errors import CheckpointError

# Incremented while tracing (not while running): lets tests check that steps do not retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(dtype) -> jnp.dtype:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise CheckpointError(f"transformer dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return jnp.dtype(_DTYPES[name])


def _forward_pure(graphdef, path, gather, params, x, rope_img, t, txt, rope_txt, ref_kv=None, key_lengths=None):
    TRACE_COUNTS["forward"] += 1
    with attention_path(path), placement.gathering(gather):
        return forward(nnx.merge(graphdef, params), x, rope_img, t, txt, rope_txt, ref_kv, key_lengths)


def _prepass_pure(graphdef, path, gather, params, ref, rope_ref, key_lengths=None):
    TRACE_COUNTS["reference_prepass"] += 1
    with attention_path(path), placement.gathering(gather):
        return reference_prepass(nnx.merge(graphdef, params), ref, rope_ref, key_lengths)


# The graphdef (model structure: config and dtype), the attention path and the layer gathering
# (None, or the replicated sharding when the block weights are split over "model",
# runtime/placement.py) are static, so models of the same kind share compiled programs; weights
# are ordinary arguments.
_forward_jit = jax.jit(_forward_pure, static_argnums=(0, 1, 2))
_prepass_jit = jax.jit(_prepass_pure, static_argnums=(0, 1, 2))


def kv_shapes(config: Flux2Config, length: int, batch: int = 1) -> tuple[tuple[int, ...], ...]:
    """Shapes of a `ReferenceKV` of `batch` rows and `length` keys: double K, double V, single K, single V."""
    double = (config.depth, batch, config.num_heads, length, config.head_dim)
    single = (config.depth_single_blocks, batch, config.num_heads, length, config.head_dim)
    return double, double, single, single


class CompiledTransformer:
    """A FLUX.2 [klein] transformer with its weights, forward and pre-pass jit-compiled; call it like the
    reference transformer (see module doc)."""

    def __init__(self, config: Flux2Config, graphdef, params, dtype, attention: str | None = None, gather=None):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.graphdef = graphdef
        self.params = params
        self.gather = gather  # the sharding each layer's weights are gathered to where they are split, else None
        self.use_attention(attention)
        self._rope_cache: dict = {}
        if jax.default_backend() == "cpu":
            keep_freed_buffers()  # XLA:CPU re-allocates its temporaries every call (see host_memory)

    # ---- construction -------------------------------------------------------------------------

    @staticmethod
    def expected_bfl_shapes(config: Flux2Config) -> dict[str, tuple[int, ...]]:
        """The full BFL single-file key -> torch shape table for `config`."""
        return expected_bfl_shapes(config)

    @classmethod
    def _abstract(cls, config: Flux2Config, dtype):
        model = nnx.eval_shape(lambda: Flux2Transformer(config, rngs=nnx.Rngs(0), dtype=dtype))
        return nnx.split(model)

    @classmethod
    def from_bfl_tensors(cls, config: Flux2Config, tensors: Mapping, dtype="float32") -> CompiledTransformer:
        """Build from BFL-named tensors (torch (out, in) layout, numpy/ml_dtypes), converting one at a time."""
        dtype = _dtype(dtype)
        graphdef, abstract = cls._abstract(config, dtype)
        pure = convert_bfl_tensors(config, tensors, nnx.to_pure_dict(abstract), dtype)
        return cls.from_pure(config, graphdef, abstract, pure, dtype)

    @classmethod
    def from_pure(cls, config: Flux2Config, graphdef, abstract, pure: dict, dtype) -> CompiledTransformer:
        """Build from a pure-dict param tree (`nnx.to_pure_dict` layout) already on the device(s);
        placed on a mesh whose "model" axis splits the block weights (`placement.loading`), each
        layer's weights are gathered where the layer runs."""
        nnx.replace_by_pure_dict(abstract, pure)
        loading = placement.loading_placement()
        gather = loading.replicated if loading is not None and loading.shards_weights else None
        return cls(config, graphdef, abstract, _dtype(dtype), gather=gather)

    @classmethod
    def random(cls, config: Flux2Config, seed: int = 0, dtype="float32") -> CompiledTransformer:
        """Random weights (normal, std 1/sqrt(fan_in); norm scales 1) — for benchmarks and smoke tests."""
        dtype = _dtype(dtype)
        graphdef, _ = cls._abstract(config, dtype)
        # one compiled program creates every parameter on device (eager init compiles per shape)
        params = jax.jit(lambda: nnx.state(Flux2Transformer(config, rngs=nnx.Rngs(seed), dtype=dtype)))()
        return cls(config, graphdef, params, dtype)

    # ---- running --------------------------------------------------------------------------------

    def use_attention(self, path: str | None) -> None:
        """Compile later calls with attention kernel `path` ("cpu", "xla", "cudnn"; None: per backend)."""
        if path is not None and path not in PATHS:
            raise CheckpointError(f"attention path {path!r} is not supported; use one of {', '.join(PATHS)}")
        self.attention = path
        self.forward_fn = functools.partial(_forward_jit, self.graphdef, path, self.gather)
        self.prepass_fn = functools.partial(_prepass_jit, self.graphdef, path, self.gather)
        # what the step-cached loop runs (sampling/step_cache.py)
        self.stages = TransformerStages(self.graphdef, path, self.gather)

    def rope(self, ids) -> tuple[jax.Array, jax.Array]:
        """Device RoPE tables for position ids (N, 4) (cached per distinct ids)."""
        ids = np.asarray(ids)
        key = (ids.shape, ids.tobytes())
        if key not in self._rope_cache:
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            self._rope_cache[key] = jax.device_put(rope_tables(ids, self.config.axes_dim, self.config.theta))
        return self._rope_cache[key]

    def rope_rows(self, ids) -> tuple[jax.Array, jax.Array]:
        """Device RoPE tables (B, N, ...) for per-row position ids (B, N, 4), stacked on the host
        (one transfer, no program)."""
        tables = [rope_tables(np.asarray(row), self.config.axes_dim, self.config.theta) for row in ids]
        return jax.device_put(tuple(np.stack(parts) for parts in zip(*tables)))

    def __call__(self, x, x_ids, t, txt, txt_ids, ref_kv: ReferenceKV | None = None, key_lengths=None) -> jax.Array:
        """Velocity (B, N, 128) for tokens x (B, N, 128) at time t (B,) or scalar; optional cached ref K/V."""
        x = jnp.asarray(x)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        lengths = None if key_lengths is None else jnp.asarray(key_lengths, jnp.int32)
        return self.forward_fn(
            self.params, x, self.rope(x_ids), t, jnp.asarray(txt), self.rope(txt_ids), ref_kv, lengths
        )

    def kv_shape(self, length: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of a batch-1 `ReferenceKV` of `length` keys: double K, double V, single K, single V."""
        return kv_shapes(self.config, length)

    def reference_kv(self, ref, ref_ids, key_lengths=None, params=None) -> ReferenceKV:
        """Reference pre-pass: per-layer post-RoPE K/V of reference tokens ref (1 or B, R, 128).

        key_lengths (B,): real tokens per row when rows are padded to one length. params: weights
        to use instead of the loaded ones (LoRA-merged, see lora/merge.py)."""
        lengths = None if key_lengths is None else np.asarray(key_lengths, np.int32)  # an argument, no eager op
        return self.prepass_fn(self.params if params is None else params, ref, self.rope(ref_ids), lengths)
