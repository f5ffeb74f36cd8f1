"""The denoising loop: every step of one batch in jitted programs that the persistent compilation
cache can keep.

Four ways a step can see its references, all in one loop body:

* none            text-to-image: the transformer sees [txt, img];
* cached K/V      KV model: reference pre-passes (run once per reference set, outside) serve every
                  step, step 0 included — one batch-1 K/V shared by every row, or one K/V per row
                  (different reference sets, padded to a length bucket and masked);
* concatenated    plain Klein: reference tokens (per row, padded and masked) are appended after the
                  output tokens every step (as `Flux2KleinPipeline`), and their velocities dropped;
* + CFG           base models: the negative prompt is batched with the positive one and
                  `v = u + w·(c − u)`.

The sampler (`sampling.base.Sampler`) is a static argument: it owns the update and its state
(multistep history); stochastic samplers draw per-row noise from keys derived from each row's
seed. Sigmas are a device array walked by `lax.fori_loop`, so one compiled program serves every
call with the same shapes and sampler.

Two programs per loop: `_prepare` (once per call: CFG tiling of the per-row inputs, the initial
sampler and cache state) and `_steps`, which runs steps [start, stop) over the carried state. Both
bounds are traced, so one `_steps` program serves a whole loop in one call or a step per call; the
host reports progress between calls. (No host callback inside a program: JAX does not persist
programs that hold one.) A step's arithmetic is the same however the steps are split into calls,
and the same as when the loop was one program with a callback (tests/engine/test_loop_chunks.py).

A step cache (`step_cache_settings.StepCache`, static) runs the same loop through
`step_cache.cached_forward` (the DiT's own stages over three block ranges) and also returns its
per-step record; without one the loop is the plain one.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flowgen.engine.runtime import placement
from flowgen.engine.runtime.placement import Placement, row_spec
from flowgen.engine.sampling import step_cache as step_caches
from flowgen.engine.sampling.base import Sampler
from flowgen.engine.sampling.flow_schedule import NUM_TRAIN_TIMESTEPS
from flowgen.engine.transformer.model import ReferenceKV

# Incremented while tracing: tests check that repeated calls with the same shapes do not retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()

# Stochastic samplers' per-row keys: fold_in(seed key, NOISE_STREAM) so they never coincide with
# the initial-noise key of the same seed.
NOISE_STREAM = 0x5A4D


class Conditioning(NamedTuple):
    """What the transformer sees besides the noisy tokens (None where a mode does not use it)."""

    txt: jax.Array  # (B, T, D) positive prompts (as the steps read it, `_prepare`: with CFG (2B, T, D), + negatives)
    rope_txt: tuple  # RoPE tables of the text ids, (T, d/2) each
    rope_img: tuple  # RoPE of the output ids (+ reference ids when concatenated): (N', d/2) or per row (B, N', d/2)
    ref_kv: ReferenceKV | None = None  # KV model: cached reference K/V, batch 1 (shared) or B (per row)
    ref_tokens: jax.Array | None = None  # plain Klein: (1 or B, R, C) reference tokens to append
    key_lengths: jax.Array | None = None  # (B,) int32 valid keys per row over [txt, img, refs]; None: all
    neg: jax.Array | None = None  # CFG: (B, T, D) negative prompts, one per row (None: no CFG)


def model_time(sigma, quantize_bf16: bool = False):
    """The flow time handed to the transformer for noise level sigma, as diffusers rounds it:
    t = (1000·σ)/1000 in float32, or through bf16 when the pipeline runs in bf16 (see
    `flow_schedule.model_timesteps`, its host twin)."""
    scale = jnp.float32(NUM_TRAIN_TIMESTEPS)
    t_train = jnp.asarray(sigma, jnp.float32) * scale
    if quantize_bf16:  # reduce_precision, not astype round trips: XLA drops those under jit
        return round_to_bf16(round_to_bf16(t_train) / scale)
    return t_train / scale


def round_to_bf16(x: jax.Array) -> jax.Array:
    """float32 x rounded to bfloat16's precision, kept in float32."""
    info = jnp.finfo(jnp.bfloat16)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def row_noise(keys: jax.Array, i, k: int, shape: tuple[int, ...]) -> jax.Array:
    """(B, *shape) standard normal float32, row b from keys[b] folded with (step i, draw k)."""

    def one(key):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), k), shape, jnp.float32)

    return jax.vmap(one)(keys)


def sample(sampler: Sampler, model: Callable, carry, sigmas: jax.Array, keys: jax.Array, start, stop):
    """Run `sampler` over steps [start, stop) of `sigmas` (N + 1,) from carry (x (B, N, C), sampler
    state); pure and traceable (used inside jit). keys: (B,) PRNG keys, one per row (used by
    stochastic samplers only). Returns the carry after step stop - 1."""
    x = carry[0]

    def noise(i, k: int = 0):
        return row_noise(keys, i, k, x.shape[1:])

    def body(i, carry):
        x, state = carry
        return sampler.step(model, i, x, state, sigmas, noise)

    return jax.lax.fori_loop(start, stop, body, carry)


# ---- the compiled loop -------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "step_cache", "stages", "rows_axis"))
def _prepare(
    params, x, cond: Conditioning, sigmas, *, cfg: bool, sampler: Sampler, step_cache=None, stages=None, rows_axis=None
):
    """(cond as the steps read it, initial carry): once per loop call, whatever its number of `_steps`
    calls. With CFG the negatives join the positives ([txt, neg]) and per-row inputs are tiled for
    both halves; reference tokens are broadcast to the model batch. rows_axis: see `_steps`."""
    TRACE_COUNTS["prepare"] += 1
    batch, n = x.shape[0], x.shape[1]
    width = 2 * batch if cfg else batch
    ref_kv, ref_tokens, lengths = cond.ref_kv, cond.ref_tokens, cond.key_lengths
    rope_img = cond.rope_img
    if cfg:  # per-row inputs serve both halves of the CFG batch (tiled once, outside the steps)
        if ref_kv is not None and ref_kv.double_k.shape[1] > 1:
            ref_kv = jax.tree.map(lambda a: jnp.concatenate([a, a], axis=1), ref_kv)
        if ref_tokens is not None and ref_tokens.shape[0] > 1:
            ref_tokens = jnp.concatenate([ref_tokens, ref_tokens], axis=0)
        if rope_img[0].ndim == 3:
            rope_img = tuple(jnp.concatenate([a, a], axis=0) for a in rope_img)
        if lengths is not None:
            lengths = jnp.concatenate([lengths, lengths], axis=0)
    if ref_tokens is not None:
        ref_tokens = jnp.broadcast_to(ref_tokens.astype(x.dtype), (width, *ref_tokens.shape[1:]))
    carry = (x, sampler.init_state(x))
    txt = cond.txt if cond.neg is None else jnp.concatenate([cond.txt, cond.neg], axis=0)
    prepared = Conditioning(txt, cond.rope_txt, rope_img, ref_kv, ref_tokens, lengths)
    if step_cache is None:
        return prepared, carry
    steps = sigmas.shape[0] - 1
    n_tokens = n + (0 if ref_tokens is None else ref_tokens.shape[1])
    state = step_caches.initial_state(stages, params, step_cache, (width, n_tokens), cond.txt.shape[1], steps, x.dtype)
    return prepared, (*carry, state)


@functools.partial(
    jax.jit, static_argnames=("forward", "cfg", "sampler", "quantize_t", "step_cache", "stages", "rows_axis")
)
def _steps(
    params,
    carry,
    cond: Conditioning,
    sigmas,
    guidance,
    keys,
    start,
    stop,
    *,
    forward,
    cfg: bool,
    sampler: Sampler,
    quantize_t: bool,
    step_cache=None,
    stages=None,
    rows_axis=None,
):
    """Steps [start, stop) of the loop over `carry` ((x, sampler state) [+ cache state]); the new carry.
    cond: as `_prepare` left it (tiled for CFG). rows_axis: the mesh axis the batch's rows are split
    over when this runs under `shard_map` (each device on its rows; the step caches then decide
    over every device's rows), else None."""
    with placement.rows_split(rows_axis):
        TRACE_COUNTS["denoise"] += 1
        x = carry[0]
        batch, n = x.shape[0], x.shape[1]
        width = 2 * batch if cfg else batch
        txt, rope_txt = cond.txt, cond.rope_txt
        ref_kv, ref_tokens, lengths, rope_img = cond.ref_kv, cond.ref_tokens, cond.key_lengths, cond.rope_img

        def model_using(transformer):  # the sampler's model(x, sigma) around transformer(tokens, times)
            def model(x, sigma):
                tokens = jnp.concatenate([x, x], axis=0) if cfg else x
                if ref_tokens is not None:
                    tokens = jnp.concatenate([tokens, ref_tokens], axis=1)
                times = jnp.broadcast_to(model_time(sigma, quantize_t), (width,))
                v = transformer(tokens, times)[:, :n]
                if cfg:
                    cond_v, uncond_v = v[:batch], v[batch:]
                    v = uncond_v + guidance * (cond_v - uncond_v)
                return v

            return model

        if step_cache is None:
            plain = lambda tokens, times: forward(params, tokens, rope_img, times, txt, rope_txt, ref_kv, lengths)  # noqa: E731
            return sample(sampler, model_using(plain), carry, sigmas, keys, start, stop)
        # step caches (sampling/step_cache.py): the carry also holds the cache's state and per-step record
        steps = sigmas.shape[0] - 1
        ranges = step_caches.block_ranges(stages, params, step_cache, ref_kv)  # weights sliced outside the steps

        def run(tokens, times, cache_state, i, decided):
            return step_caches.cached_forward(
                stages,
                step_cache,
                ranges,
                params,
                tokens,
                rope_img,
                times,
                txt,
                rope_txt,
                lengths,
                cache_state,
                i,
                steps,
                decided,
            )

        shape = x.shape[1:]
        return step_caches.sample_cached(
            sampler, model_using, run, carry, sigmas, lambda i, k=0: row_noise(keys, i, k, shape), start, stop
        )


class Denoiser:
    """Runs the whole sampling loop for a transformer's jitted pure forward.

    `forward(params, x, rope_img, t, txt, rope_txt, ref_kv, key_lengths)` is `CompiledTransformer.forward_fn`.
    """

    def __init__(self, forward, stages=None, placement: Placement | None = None):
        # `forward` is a static argument of module-level jits: pipelines sharing a transformer
        # share compiled loops. `stages` (`CompiledTransformer.stages`) lets the loop run step caches.
        # `placement`: the device mesh; its "data" axis splits the batch's rows (see `_on_mesh`).
        self.forward = forward
        self.stages = stages
        self.placement = placement

    def __call__(
        self,
        params,
        x: jax.Array,
        cond: Conditioning,
        sigmas,
        sampler: Sampler,
        keys: jax.Array,
        guidance: float | None = None,
        *,
        quantize_t: bool = False,
        on_step: Callable[[int], None] | None = None,
        step_cache=None,
    ):
        """Denoise tokens x (B, N, C) along sigmas (N + 1,); returns the final tokens in x's dtype.

        on_step(steps_done) is called on the host after each step (the loop then runs a program
        call per step; without it, one call). With `step_cache` (a `step_cache_settings.StepCache`)
        returns (tokens, record): record["distances"] and record["computed"] are numpy arrays with
        one entry per step.
        """
        if step_cache is not None and self.stages is None:
            raise ValueError("step caches need the transformer's stages: Denoiser(forward, transformer.stages)")
        cfg = guidance is not None
        g = np.float32(guidance if cfg else 1.0)  # host scalars go in as arguments (no eager op)
        sigmas = jax.device_put(np.asarray(sigmas, np.float32))  # a transfer (jnp.asarray: a program)
        steps = sigmas.shape[0] - 1
        cache = {} if step_cache is None else {"step_cache": step_cache, "stages": self.stages}
        prepare_static = dict(cfg=cfg, sampler=sampler, **cache)
        steps_static = dict(forward=self.forward, cfg=cfg, sampler=sampler, quantize_t=quantize_t, **cache)
        prepare, run_steps = functools.partial(_prepare, **prepare_static), functools.partial(_steps, **steps_static)
        rows = x.shape[0]
        if self.placement is not None and self.placement.data > 1:
            x, cond, keys = _pad_rows(-rows % self.placement.data, x, cond, keys)  # whole rows per device
            x, cond, keys = _place_rows(self.placement, x, cond, keys)
            prepare, run_steps = _on_mesh(self.placement, params, x, cond, sigmas, prepare_static, steps_static)
        prepared, carry = prepare(params, x, cond, sigmas)
        bounds = [(i, i + 1) for i in range(steps)] if on_step is not None else [(0, steps)]
        for start, stop in bounds:
            carry = run_steps(params, carry, prepared, sigmas, g, keys, np.int32(start), np.int32(stop))
            if on_step is not None:
                jax.block_until_ready(carry[0])
                on_step(stop)
        tokens = jax.block_until_ready(carry[0] if carry[0].shape[0] == rows else carry[0][:rows])
        if step_cache is None:
            return tokens
        state = carry[2]
        return tokens, {"distances": placement.to_host(state.distances), "computed": placement.to_host(state.computed)}


# ---- on a mesh: each device runs the one-device program on its rows -----------------------------


def _cond_specs(cond: Conditioning, batch: int) -> Conditioning:
    """Which of a loop's inputs carry the batch's rows (split over "data") and which serve every row."""

    def rows_if_batch(a, axis: int = 0):
        return row_spec(axis) if a.shape[axis] == batch else P()

    return Conditioning._make(  # a Conditioning of PartitionSpecs: the same pytree as `cond`
        (
            row_spec(),  # txt
            tuple(P() for _ in cond.rope_txt),
            tuple(row_spec() if a.ndim == 3 else P() for a in cond.rope_img),
            None if cond.ref_kv is None else type(cond.ref_kv)(*(rows_if_batch(a, 1) for a in cond.ref_kv)),
            None if cond.ref_tokens is None else rows_if_batch(cond.ref_tokens),
            None if cond.key_lengths is None else row_spec(),
            None if cond.neg is None else row_spec(),
        )
    )


def _pad_rows(pad: int, x, cond: Conditioning, keys):
    """x, cond and keys with `pad` copies of the last row appended to every per-row input: a copy
    changes no other row, nor a step cache's batch-wide decision (a maximum over the rows)."""
    if not pad:
        return x, cond, keys
    batch = x.shape[0]

    def padded(a, spec):
        if spec == P():
            return a
        axis = tuple(spec).index("data")
        last = jax.lax.slice_in_dim(a, batch - 1, batch, axis=axis)
        return jnp.concatenate([a, *([last] * pad)], axis=axis)

    specs = (row_spec(), _cond_specs(cond, batch), row_spec())
    return jax.tree.map(padded, (x, cond, keys), specs, is_leaf=lambda a: isinstance(a, P))


def _place_rows(placement: Placement, x, cond: Conditioning, keys):
    """x, cond and keys on the mesh: rows split over "data", the rest replicated (from wherever they are)."""
    specs = (row_spec(), _cond_specs(cond, x.shape[0]), row_spec())
    shardings = jax.tree.map(
        lambda spec: NamedSharding(placement.mesh, spec), specs, is_leaf=lambda a: isinstance(a, P)
    )
    return placement.put((x, cond, keys), shardings)  # over several processes: each fills its own shards


def _local(tree, specs, data: int):
    """Abstract values of `tree` as one device sees them: each axis split over "data" divided by `data`."""

    def one(a, spec):
        shape = [
            size // data if name == "data" else size
            for size, name in zip(a.shape, tuple(spec) + (None,) * (len(a.shape) - len(spec)))
        ]
        return jax.ShapeDtypeStruct(tuple(shape), a.dtype)

    return jax.tree.map(one, tree, specs, is_leaf=lambda a: isinstance(a, P))


def _split_specs(whole, local, data: int):
    """PartitionSpecs of an output from its whole and one-device abstract values: the axis that is
    `data` times larger whole is split over "data"; equal shapes are replicated."""

    def one(w, part):
        for axis, (a, b) in enumerate(zip(w.shape, part.shape)):
            if a != b:
                assert a == data * b, (w.shape, part.shape)
                return row_spec(axis)
        return P()

    return jax.tree.map(one, whole, local)


_MESH_PROGRAMS: dict = {}  # the shard_map'd programs, by mesh, static settings and input layout


def _on_mesh(placement: Placement, params, x, cond: Conditioning, sigmas, prepare_static: dict, steps_static: dict):
    """`_prepare` and `_steps` under `shard_map`, manual over "data" ("model" is left to XLA, which
    gathers split block weights a layer at a time): every device runs the one-device program on its
    own rows, so the loop holds no collective but the step caches' batch-wide max. Returns the two
    callables with `_prepare`'s and `_steps`'s positional arguments."""
    mesh, data = placement.mesh, placement.data
    cond_specs = _cond_specs(cond, x.shape[0])
    shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), (x, cond))
    key = (
        mesh,
        tuple(sorted(prepare_static.items(), key=str)),
        tuple(sorted(steps_static.items(), key=str)),
        jax.tree.structure((x, cond)),
        shapes,
        cond_specs,
    )
    if key not in _MESH_PROGRAMS:
        prepare = functools.partial(_prepare, **prepare_static)
        whole = jax.eval_shape(prepare, params, x, cond, sigmas)
        local = jax.eval_shape(prepare, params, *_local((x, cond), (row_spec(), cond_specs), data), sigmas)
        prepared_specs, carry_specs = _split_specs(whole, local, data)
        manual = frozenset({"data"})  # "model" stays with XLA
        prepare_program = jax.jit(
            jax.shard_map(
                functools.partial(_prepare, **prepare_static, rows_axis="data"),
                in_specs=(P(), row_spec(), cond_specs, P()),
                out_specs=(prepared_specs, carry_specs),
                mesh=mesh,
                axis_names=manual,
            )
        )
        steps_program = jax.jit(
            jax.shard_map(
                functools.partial(_steps, **steps_static, rows_axis="data"),
                in_specs=(P(), carry_specs, prepared_specs, P(), P(), row_spec(), P(), P()),
                out_specs=carry_specs,
                mesh=mesh,
                axis_names=manual,
            )
        )
        _MESH_PROGRAMS[key] = (prepare_program, steps_program)
    return _MESH_PROGRAMS[key]


def noise_keys(seeds) -> jax.Array:
    """(B,) PRNG keys for stochastic samplers, one per seed (64-bit seeds keep their high word)."""
    return _noise_keys(seed_words(seeds))


def seed_words(seeds) -> np.ndarray:
    """(B, 2) uint32 key data of each seed: its high and low 32-bit words."""
    return np.array([[seed >> 32, seed & 0xFFFFFFFF] for seed in seeds], dtype=np.uint32).reshape(-1, 2)


def keys_of_words(words) -> jax.Array:
    """`noise_keys` from `seed_words` (B, 2), traceable: the pipeline draws them in the program
    that draws the initial noise."""
    return jax.vmap(lambda k: jax.random.fold_in(k, NOISE_STREAM))(jax.random.wrap_key_data(words))


_noise_keys = jax.jit(keys_of_words)  # one program (op by op, three)
