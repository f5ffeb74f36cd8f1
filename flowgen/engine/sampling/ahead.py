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

Batches with references are compiled too: a plan knows each row's reference set (its identity and
each image's stored size) before any image is decoded, and that fixes everything their programs
depend on: each image's prepared size (`references.images.prepared_size`: its VAE encode program),
each set's length bucket (its reference pre-pass) and the batch's layout
(`references.batch_layout.choose_layout`: its loop's reference inputs). The VAE programs (each
reference size's encode, each output size's decode) compile as soon as the VAE is loaded, while
the transformer and text encoder load. On a mesh only the loops are compiled ahead (the pre-pass
and VAE inputs are placed at the call).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from flowgen.engine.references.batch_layout import Layout, choose_layout
from flowgen.engine.references.cache import length_bucket
from flowgen.engine.references.images import prepared_size
from flowgen.engine.runtime import compile_cache
from flowgen.engine.runtime.host_threads import host_cores
from flowgen.engine.runtime.placement import Placement, row_spec
from flowgen.engine.sampling import loop, names, step_cache_settings
from flowgen.engine.transformer.compiled import kv_shapes
from flowgen.engine.transformer.model import ReferenceKV
from flowgen.engine.transformer.positions import text_ids
from flowgen.engine.transformer.rope import rope_tables
from flowgen.engine.vae.model import to_uint8_jit

log = logging.getLogger(__name__)
T = TypeVar("T")
PIXELS_PER_TOKEN = 16
MAX_AHEAD = 32  # distinct programs of each kind (loops, pre-passes, encodes, decodes) compiled ahead
_STACKED = ("double_blocks", "single_blocks")


@dataclass(frozen=True)
class ReferenceSet:
    """One row's reference images as a plan knows them, before any is decoded."""

    identity: str  # equal identities are the same images (rows sharing one share a pre-pass)
    sizes: tuple[tuple[int, int], ...]  # each image's (width, height) as stored, upright

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """Each image's (height, width) in pixels once prepared (resized, cropped)."""
        return tuple(prepared_size(width, height) for width, height in self.sizes)

    @property
    def tokens(self) -> int:
        return sum((h // PIXELS_PER_TOKEN) * (w // PIXELS_PER_TOKEN) for h, w in self.grids)


@dataclass(frozen=True)
class LoopShape:
    """What one batch's programs are compiled for."""

    batch: int
    width: int
    height: int
    steps: int
    guidance: float | None = None  # CFG scale (ignored by step-distilled models)
    scheduler: str | None = None  # a spec scheduler name; None: the model's own
    acceleration: str | None = None  # step-cache preset (None: the spec default)
    accelerator_options: tuple = ()  # acceleratorOptions as sorted (name, value) pairs
    references: tuple[ReferenceSet | None, ...] = ()  # per row (None: none); (): no row has references

    @property
    def layout(self) -> Layout:
        """The batch's reference layout, as `batch_references` will choose it from the decoded images."""
        rows = self.references or (None,) * self.batch
        return choose_layout(
            [None if refs is None else (refs.identity, functools.partial(_bucket, refs)) for refs in rows]
        )


def _bucket(refs: ReferenceSet) -> int:
    return length_bucket(refs.tokens)


@dataclass
class Model:
    """The compiled transformer's static parts, before any weight is loaded."""

    config: Any
    graphdef: Any
    params: Any  # abstract: jax.ShapeDtypeStruct leaves, with their shardings on a mesh
    forward: Any
    prepass: Any  # the jitted reference pre-pass with its static arguments bound (a functools.partial)
    stages: Any
    dtype: jnp.dtype
    kv_model: bool  # reference K/V cached by a pre-pass (KV models), else reference tokens appended
    identity: str  # what its programs depend on besides their inputs: config, dtype, attention, mesh


def abstract_model(config, dtype: str, attention: str | None, placement: Placement | None, kv_model: bool) -> Model:
    """The transformer as the loop sees it (graphdef, abstract parameters, jitted forward), unloaded."""
    from flowgen.engine.transformer.compiled import CompiledTransformer, _dtype, _forward_jit, _prepass_jit
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
    prepass = functools.partial(_prepass_jit, graphdef, attention, gather)
    stages = TransformerStages(graphdef, attention, gather)
    mesh = None if placement is None else (dict(placement.mesh.shape), [d.id for d in placement.mesh.devices.flat])
    identity = f"{config!r} {dt.name} attention={attention} mesh={mesh} gathered={gather is not None}"
    return Model(config, graphdef, params, forward, prepass, stages, dt, kv_model, identity)


def start(
    shapes: Sequence[LoopShape],
    model: Model,
    *,
    distilled: bool,
    text_length: int,
    placement: Placement | None,
    coefficients=None,
) -> list[concurrent.futures.Future]:
    """Compile the shapes' distinct loops and (on one device, KV models) their reference sets'
    distinct pre-passes, in host threads; the futures resolve to each one's (start, end) time (`finish`)."""
    # a loop depends on its sets' layout only: shapes equal but for the sets they hold share one
    loops = _first((dataclasses.replace(shape, references=()), shape.layout) for shape in shapes)
    settings = f"distilled={distilled} text={text_length} coefficients={coefficients!r} {model.identity}"
    jobs = [
        (
            f"loop {shape!r} {layout!r} {settings}",
            functools.partial(
                compile_loop,
                shape,
                layout,
                model,
                distilled=distilled,
                text_length=text_length,
                placement=placement,
                coefficients=coefficients,
            ),
        )
        for shape, layout in loops
    ]
    if placement is None and model.kv_model:
        sets = (refs for shape in shapes for refs in shape.references if refs is not None)
        prepasses = _first((length_bucket(refs.tokens), length_bucket(refs.tokens) != refs.tokens) for refs in sets)
        jobs += [
            (f"prepass {length} {padded} {model.identity}", functools.partial(compile_prepass, length, padded, model))
            for length, padded in prepasses
        ]
    return _submit(jobs)


def start_vae(shapes: Sequence[LoopShape], vae, placement: Placement | None) -> list[concurrent.futures.Future]:
    """Compile the loaded `vae`'s programs the shapes need, in host threads: each prepared reference
    size's encode and each output size's decode (on one device; on a mesh they compile at first use)."""
    if placement is not None:
        return []
    grids = _first(grid for shape in shapes for refs in shape.references if refs is not None for grid in refs.grids)
    decodes = _first((_decode_rows(shape.batch), shape.height, shape.width) for shape in shapes)
    identity = f"{vae.config!r} {vae.dtype.name}"
    return _submit(
        [(f"encode {grid} {identity}", functools.partial(compile_encode, vae, grid)) for grid in grids]
        + [(f"decode {decode} {identity}", functools.partial(compile_decode, vae, *decode)) for decode in decodes]
    )


def _first(programs: Iterable[T]) -> list[T]:
    """The first MAX_AHEAD distinct programs, in plan order (the rest compile at first use, so a
    plan of thousands of differently sized references does not wait for all of them to start)."""
    return list(itertools.islice(dict.fromkeys(programs), MAX_AHEAD))


def finish(futures: Sequence[concurrent.futures.Future]) -> float:
    """Wait for the compiles `start` and `start_vae` began; a failed one is logged (the batch
    compiles it at first use). The wall-clock seconds from the first one's start to the last one's end."""
    spans = []
    for future in futures:
        try:
            spans.append(future.result())
        except Exception as err:  # never fatal: the first call compiles as it would have
            log.warning(
                "compiling a program ahead of time failed (%s: %s); it compiles at first use", type(err).__name__, err
            )
    return max(end for _, end in spans) - min(start for start, _ in spans) if spans else 0.0


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _submit(jobs: Sequence[tuple[str, Callable[[], object]]]) -> list[concurrent.futures.Future]:
    """Start each (description, compile) job whose program no earlier process compiled ahead into
    the cache (`compile_cache.ahead_mark`: that program's first call reads it back instead)."""
    global _pool
    if _pool is None:  # one compile per core (and at most 4): more only slow each other down
        _pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, host_cores()), thread_name_prefix="aot")
    marks = [(compile_cache.ahead_mark(description), job) for description, job in jobs]
    return [_pool.submit(_timed, job, mark) for mark, job in marks if mark is None or not mark.exists()]


def _timed(job: Callable[[], object], mark: Path | None) -> tuple[float, float]:
    started = time.perf_counter()
    job()
    ended = time.perf_counter()
    if mark is not None:
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
        except OSError:  # only a hint: the next run compiles this program ahead again
            pass
    return started, ended


def compile_loop(
    shape: LoopShape,
    layout: Layout,
    model: Model,
    *,
    distilled: bool,
    text_length: int,
    placement: Placement | None,
    coefficients=None,
) -> None:
    """Lower and compile `_prepare` and `_steps` for `shape` and its reference `layout` exactly as
    `Denoiser` calls them."""
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
    rope_img, ref_kv, ref_tokens, key_lengths = _reference_inputs(layout, model, h * w)
    cond = loop.Conditioning._make(
        (txt, _rope(text_ids(text_length), config), rope_img, ref_kv, ref_tokens, key_lengths, txt if cfg else None)
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


def compile_prepass(length: int, padded: bool, model: Model) -> None:
    """The reference pre-pass of a set padded to `length` tokens, as `ReferenceCache` calls it (key
    lengths only when some of them are padding)."""
    ref = jax.ShapeDtypeStruct((1, length, model.config.in_channels), jnp.float32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32) if padded else None
    _lower(model.prepass, model.params, ref, _rope_shape(length, model.config), lengths).compile()


def compile_encode(vae, grid: tuple[int, int]) -> None:
    """The VAE encode of one prepared reference of `grid` = (height, width) pixels (batch 1)."""
    images = jax.ShapeDtypeStruct((1, *grid, 3), jnp.float32)
    _lower(vae.encode_fn, vae.params, images).compile()


def compile_decode(vae, rows: int, height: int, width: int) -> None:
    """The VAE decode (and quantisation) of `rows` latents of an output of height x width pixels."""
    latents = jax.ShapeDtypeStruct(
        (rows, vae.config.token_channels, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN), jnp.float32
    )
    _lower(vae.decode_float_fn, vae.params, latents).compile()
    to_uint8_jit.lower(jax.ShapeDtypeStruct((rows, height, width, 3), jnp.float32)).compile()


def _reference_inputs(layout: Layout, model: Model, image_tokens: int) -> tuple:
    """(rope_img, ref_kv, ref_tokens, key_lengths) of a loop's Conditioning, as abstract values, for
    a batch of this reference layout (`references/batch_layout.batch_references` builds the real ones)."""
    config = model.config
    if layout.reference_layout == "none":
        return _rope_shape(image_tokens, config), None, None, None
    rows = 1 if layout.reference_layout == "shared" else layout.batch
    length = layout.reference_length
    key_lengths = jax.ShapeDtypeStruct((layout.batch,), jnp.int32)
    if model.kv_model:
        kv = ReferenceKV._make(jax.ShapeDtypeStruct(s, model.dtype) for s in kv_shapes(config, length, rows))
        return _rope_shape(image_tokens, config), kv, None, key_lengths
    tokens = jax.ShapeDtypeStruct((rows, length, config.in_channels), jnp.float32)
    per_row = layout.batch if layout.reference_layout == "rows" else None  # each row's own reference positions
    return _rope_shape(image_tokens + length, config, per_row), None, tokens, key_lengths


def _prepass_programs(shapes: Sequence[LoopShape]) -> list[tuple[int, bool]]:
    """The distinct pre-pass programs of the shapes' reference sets: (length bucket, padded)."""
    counts = {refs.tokens for shape in shapes for refs in shape.references if refs is not None}
    return sorted({(length_bucket(tokens), length_bucket(tokens) != tokens) for tokens in counts})


def _decode_rows(batch: int) -> int:
    """Rows per decode program: one on the CPU backend (`vae.model._by_image`), else the batch."""
    return 1 if jax.default_backend() == "cpu" else batch


def _lower(bound: functools.partial, *args):
    """Lower a jitted function whose static arguments a functools.partial binds."""
    jitted: Any = bound.func
    return jitted.lower(*bound.args, *args, **bound.keywords)


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


def _rope_shape(tokens: int, config, rows: int | None = None) -> tuple:
    """Abstract RoPE tables (cos, sin) for `tokens` positions, shared or per row."""
    table = jax.ShapeDtypeStruct((*((rows,) if rows else ()), tokens, sum(config.axes_dim) // 2), jnp.float32)
    return table, table
