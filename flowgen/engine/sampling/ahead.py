"""Compile a run's sampling loops ahead of time, from shapes alone, while the weights load.

    shapes = [LoopShape(batch=8, width=1024, height=1024, steps=4)]
    Pipeline.from_pretrained("klein-9b-kv", compile_ahead=shapes)   # compiles in threads, then loads

The loop (`loop._prepare` and `loop._steps`, or their `shard_map` versions on a mesh) is the
largest program a batch runs. Everything it is compiled for is known before a weight is read:
the transformer's config (its parameters as abstract values, with their shardings on the mesh),
the dtype, the batch's shape, sampler, CFG and step cache. So `jit.lower(...).compile()` runs on
`jax.ShapeDtypeStruct`s in a thread pool while the main thread loads the weights, and writes each
program to the persistent compilation cache (`runtime/compile_cache.py`), where the first batch's
own call finds it (JAX keys the cache by the program, not by the Python objects that traced it).
Batches with references are compiled at first use: their layout (shared or per-row K/V, the
length bucket) follows from the decoded reference images.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from flowgen.engine.runtime.placement import Placement, row_spec
from flowgen.engine.sampling import loop, names, step_cache_settings
from flowgen.engine.transformer.positions import image_ids, text_ids
from flowgen.engine.transformer.rope import rope_tables

log = logging.getLogger(__name__)
PIXELS_PER_TOKEN = 16
_STACKED = ("double_blocks", "single_blocks")


@dataclass(frozen=True)
class LoopShape:
    """What one batch's sampling loop is compiled for (a plan batch without references)."""

    batch: int
    width: int
    height: int
    steps: int
    guidance: float | None = None  # CFG scale (ignored by step-distilled models)
    scheduler: str | None = None  # a spec scheduler name; None: the model's own
    acceleration: str | None = None  # step-cache preset (None: the spec default)
    accelerator_options: tuple = ()  # acceleratorOptions as sorted (name, value) pairs


@dataclass
class Model:
    """The compiled transformer's static parts, before any weight is loaded."""

    config: Any
    graphdef: Any
    params: Any  # abstract: jax.ShapeDtypeStruct leaves, with their shardings on a mesh
    forward: Any
    stages: Any
    dtype: jnp.dtype


def abstract_model(config, dtype: str, attention: str | None, placement: Placement | None) -> Model:
    """The transformer as the loop sees it (graphdef, abstract parameters, jitted forward), unloaded."""
    from flowgen.engine.transformer.compiled import CompiledTransformer, _dtype, _forward_jit
    from flowgen.engine.transformer.model import TransformerStages

    dt = _dtype(dtype)
    graphdef, abstract = CompiledTransformer._abstract(config, dt)
    gather = placement.replicated if placement is not None and placement.shards_weights else None

    def leaf(path, value):
        if placement is None:
            return jax.ShapeDtypeStruct(value.shape, value.dtype)
        stacked = getattr(path[0], "key", None) in _STACKED
        return jax.ShapeDtypeStruct(
            value.shape, value.dtype, sharding=placement.weight_sharding(value.shape, value.dtype, stacked)
        )

    params = jax.tree_util.tree_map_with_path(leaf, abstract)
    forward = functools.partial(_forward_jit, graphdef, attention, gather)
    return Model(config, graphdef, params, forward, TransformerStages(graphdef, attention, gather), dt)


def start(
    shapes: Sequence[LoopShape],
    model: Model,
    *,
    distilled: bool,
    text_length: int,
    placement: Placement | None,
    coefficients=None,
    workers: int = 4,
) -> list[concurrent.futures.Future]:
    """Compile each distinct shape's loop in a thread pool; the futures resolve to seconds spent."""
    distinct = list(dict.fromkeys(shapes))
    if not distinct:
        return []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(distinct)), thread_name_prefix="aot")
    futures = [
        pool.submit(
            compile_loop,
            shape,
            model,
            distilled=distilled,
            text_length=text_length,
            placement=placement,
            coefficients=coefficients,
        )
        for shape in distinct
    ]
    pool.shutdown(wait=False)
    return futures


def finish(futures: Sequence[concurrent.futures.Future]) -> float:
    """Wait for `start`'s compiles; a failed one is logged (the batch compiles it at first use)."""
    seconds = 0.0
    for future in futures:
        try:
            seconds += future.result()
        except Exception as err:  # never fatal: the first call compiles as it would have
            log.warning(
                "compiling a sampling loop ahead of time failed (%s: %s); it compiles at first use",
                type(err).__name__,
                err,
            )
    return seconds


def compile_loop(
    shape: LoopShape, model: Model, *, distilled: bool, text_length: int, placement: Placement | None, coefficients=None
) -> float:
    """Lower and compile `_prepare` and `_steps` for `shape` exactly as `Denoiser` calls them."""
    import time

    started = time.perf_counter()
    config, dtype = model.config, model.dtype
    h, w = shape.height // PIXELS_PER_TOKEN, shape.width // PIXELS_PER_TOKEN
    choice = names.resolve(shape.scheduler)
    sigmas = jax.ShapeDtypeStruct((shape.steps + 1,), jnp.float32)
    cfg = shape.guidance is not None and not distilled
    step_cache = step_cache_settings.resolve(
        shape.acceleration,
        dict(shape.accelerator_options) or None,
        steps=shape.steps,
        distilled=distilled,
        coefficients=coefficients,
    )
    batch = shape.batch
    x = jax.ShapeDtypeStruct((batch, h * w, config.in_channels), dtype)
    txt = jax.ShapeDtypeStruct((batch, text_length, config.context_in_dim), dtype)
    # abstract values where the loop takes arrays (a Conditioning of ShapeDtypeStructs, for lowering only)
    cond = loop.Conditioning._make(
        (
            txt,
            _rope(text_ids(text_length), config),
            _rope(image_ids(h, w), config),
            None,
            None,
            None,
            txt if cfg else None,
        )
    )
    keys = jax.eval_shape(lambda: loop.noise_keys(list(range(batch))))
    scalar_f32, scalar_i32 = jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
    cache = {} if step_cache is None else {"step_cache": step_cache, "stages": model.stages}
    prepare_static = dict(cfg=cfg, sampler=choice.sampler(), **cache)
    steps_static = dict(
        forward=model.forward, cfg=cfg, sampler=choice.sampler(), quantize_t=dtype == jnp.bfloat16, **cache
    )
    params = model.params
    if placement is not None and placement.data > 1:
        specs = (row_spec(), loop._cond_specs(cond, batch), row_spec())
        x, cond, keys = jax.tree.map(
            lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(placement.mesh, spec)),
            (x, cond, keys),
            specs,
            is_leaf=lambda a: isinstance(a, jax.sharding.PartitionSpec),
        )
        prepare, run_steps = loop._on_mesh(placement, params, x, cond, sigmas, prepare_static, steps_static)
    else:
        prepare = _Lowerable(loop._prepare, prepare_static)
        run_steps = _Lowerable(loop._steps, steps_static)
    compiled = prepare.lower(params, x, cond, sigmas).compile()
    outputs = jax.eval_shape(prepare, params, x, cond, sigmas)
    if placement is not None and placement.data > 1:  # the steps get _prepare's outputs in its output shardings
        outputs = jax.tree.map(
            lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
            outputs,
            compiled.output_shardings,
        )
    prepared, carry = outputs
    run_steps.lower(params, carry, prepared, sigmas, scalar_f32, keys, scalar_i32, scalar_i32).compile()
    return time.perf_counter() - started


class _Lowerable:
    """A jitted function with its static keywords bound, callable and lowerable like a jitted one."""

    def __init__(self, jitted, static: dict):
        self.jitted, self.static = jitted, static

    def __call__(self, *args):
        return self.jitted(*args, **self.static)

    def lower(self, *args):
        return self.jitted.lower(*args, **self.static)


def _rope(ids: np.ndarray, config) -> tuple:
    cos, sin = rope_tables(ids, config.axes_dim, config.theta)
    return jax.ShapeDtypeStruct(cos.shape, jnp.float32), jax.ShapeDtypeStruct(sin.shape, jnp.float32)
