"""How the references of one batch reach its sampling loop: the layout, padding and key lengths.

Every row of a batch may have its own reference set (or none). Three layouts, chosen per batch:

* "none"    no row has references;
* "shared"  every row has the same set: one batch-1 K/V (KV model) or one batch-1 token block
            (plain Klein) serves all rows, never copied;
* "rows"    sets differ: each row's K/V (or tokens, with per-row RoPE) is zero-padded to the batch's
            reference length L — the largest bucket among its sets — and stacked; a row with no
            references holds only padding.

Keys are ordered [text, image, references] and a row's padding always sits at its tail, so a row's
valid keys are a prefix of length T + N + (its real reference tokens): `key_lengths` masks the rest
and a masked key weighs exactly zero. What a result needs to be replayed bit for bit — the layout,
L and the batch size — is reported as `Layout` and can be forced back (`regen`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.engine.errors import EngineInputError
from flowgen.engine.references.cache import CachedKV, PreparedSet, ReferenceCache, ReferenceTokens, padded_ids
from flowgen.engine.transformer.model import ReferenceKV

LAYOUTS = ("none", "shared", "rows")


@dataclass(frozen=True)
class Layout:
    """What fixes a batch's compiled program and arithmetic besides shapes the request gives."""

    reference_layout: str  # one of LAYOUTS
    reference_length: int  # L: padded reference tokens per row (0 for "none")
    batch: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference_layout": self.reference_layout,
            "reference_length": self.reference_length,
            "batch": self.batch,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], batch: int) -> Layout:
        kind = data.get("reference_layout")
        length = data.get("reference_length", 0)
        if kind not in LAYOUTS or not isinstance(length, int) or length < 0:
            raise EngineInputError(
                f"layout: expected reference_layout in {', '.join(LAYOUTS)} and a reference_length >= 0; got {data!r}"
            )
        return cls(kind, length, batch)


@dataclass
class BatchReferences:
    """The loop's reference inputs for one batch (see `Conditioning`)."""

    layout: Layout
    ref_kv: ReferenceKV | None  # KV model: (layers, 1 or B, heads, L, head_dim)
    ref_tokens: jax.Array | None  # plain Klein: (1 or B, L, C)
    ref_ids: np.ndarray | None  # plain Klein: (L, 4) shared or (B, L, 4) per row
    key_lengths: np.ndarray | None  # (B,) int32, or None when nothing is padded


def batch_references(
    ref_sets: list[PreparedSet | None],
    cache: ReferenceCache,
    *,
    kv_model: bool,
    fixed_keys: int,
    forced: Layout | None = None,
) -> BatchReferences:
    """Lay out the reference sets of a batch (one entry per row). fixed_keys: T + N, the keys every
    row has before its references."""
    once = _OncePerCall(cache)
    batch = len(ref_sets)
    layout = (
        _choose(ref_sets, once, kv_model) if forced is None else _check_forced(forced, ref_sets, once, kv_model, batch)
    )
    if layout.reference_layout == "none":
        return BatchReferences(layout, None, None, None, None)
    length = layout.reference_length
    if layout.reference_layout == "shared":
        refs = ref_sets[0]
        assert refs is not None  # "shared": every row holds the same set
        if kv_model:
            cached = once.kv(refs)
            real, ref_kv, tokens, ids = cached.length, _kv_rows(once, [cached.kv], length), None, None
        else:
            one = once.tokens(refs)
            real, ref_kv = one.length, None
            tokens, ids = _token_rows(once, [one.tokens], length), padded_ids(one.ids, length)
        lengths = np.full((batch,), fixed_keys + real, np.int32)
        return BatchReferences(layout, ref_kv, tokens, ids, lengths)

    reals = [0 if refs is None else _real_length(refs, once, kv_model) for refs in ref_sets]
    lengths = np.asarray([fixed_keys + real for real in reals], np.int32)
    if kv_model:
        ref_kv = _kv_rows(once, [None if refs is None else once.kv(refs).kv for refs in ref_sets], length)
        return BatchReferences(layout, ref_kv, None, None, lengths)
    sets = [None if refs is None else once.tokens(refs) for refs in ref_sets]
    tokens = _token_rows(once, [None if one is None else one.tokens for one in sets], length)
    no_ids = np.zeros((0, 4), np.int64)
    ids = np.stack([padded_ids(no_ids if one is None else one.ids, length) for one in sets])
    return BatchReferences(layout, None, tokens, ids, lengths)


class _OncePerCall:
    """The reference cache, with each set's K/V and tokens fetched once per batch: the cache itself
    keeps only KV_CACHE_BYTES of K/V (two 9B sets of 2 GiB), so a batch of 8 distinct sets would
    otherwise evict and re-run its own pre-passes while measuring and stacking them."""

    def __init__(self, cache: ReferenceCache):
        self.transformer = cache.transformer
        self._cache = cache
        self._kv: dict[tuple[str, ...], CachedKV] = {}
        self._tokens: dict[tuple[str, ...], ReferenceTokens] = {}

    def kv(self, refs: PreparedSet) -> CachedKV:
        if refs.key not in self._kv:
            self._kv[refs.key] = self._cache.kv(refs)
        return self._kv[refs.key]

    def tokens(self, refs: PreparedSet) -> ReferenceTokens:
        if refs.key not in self._tokens:
            self._tokens[refs.key] = self._cache.tokens(refs)
        return self._tokens[refs.key]


def choose_layout(rows: Sequence[tuple[Hashable, Callable[[], int]] | None]) -> Layout:
    """The layout of a batch whose rows hold these reference sets: per row None (no references) or
    (the set's identity, its padded length — called only where the layout needs it). Runs before
    any image is decoded too (sampling/ahead.py compiles a batch's loop from the plan)."""
    batch = len(rows)
    present = [row for row in rows if row is not None]
    if not present:
        return Layout("none", 0, batch)
    if len(present) == batch and len({identity for identity, _ in present}) == 1:
        return Layout("shared", present[0][1](), batch)
    return Layout("rows", max(length() for _, length in present), batch)


def _choose(ref_sets: list[PreparedSet | None], cache: _OncePerCall, kv_model: bool) -> Layout:
    return choose_layout(
        [
            None if refs is None else (refs.key, functools.partial(_padded_length, refs, cache, kv_model))
            for refs in ref_sets
        ]
    )


def _check_forced(
    forced: Layout, ref_sets: list[PreparedSet | None], cache: _OncePerCall, kv_model: bool, batch: int
) -> Layout:
    """A recorded layout, if it can hold these references."""
    forced = Layout(forced.reference_layout, forced.reference_length, batch)
    present = [refs for refs in ref_sets if refs is not None]
    needed = max((_padded_length(refs, cache, kv_model) for refs in present), default=0)
    if forced.reference_layout == "none" and present:
        raise EngineInputError("layout: 'none' was asked for a batch with references")
    if forced.reference_layout == "shared" and (len(present) != batch or len({r.key for r in present}) != 1):
        raise EngineInputError("layout: 'shared' needs the same reference set on every row")
    if forced.reference_layout != "none" and forced.reference_length < needed:
        raise EngineInputError(
            f"layout: reference_length {forced.reference_length} is shorter than these references need ({needed})"
        )
    return forced


def _padded_length(refs: PreparedSet, cache: _OncePerCall, kv_model: bool) -> int:
    return cache.kv(refs).padded_length if kv_model else int(cache.tokens(refs).tokens.shape[1])


def _real_length(refs: PreparedSet, cache: _OncePerCall, kv_model: bool) -> int:
    return cache.kv(refs).length if kv_model else cache.tokens(refs).length


def _kv_rows(cache: _OncePerCall, rows: list[ReferenceKV | None], length: int) -> ReferenceKV:
    """Batch-1 K/V per row (None: a row without references) as one (layers, rows, heads, length,
    head_dim) K/V: each zero-padded along its keys to `length`, stacked on the batch axis. The
    padding is masked by the key lengths. A single row already `length` long is used as it is."""
    if len(rows) == 1 and rows[0] is not None and rows[0].double_k.shape[3] == length:
        return rows[0]
    transformer = cache.transformer
    return _stack_kv(tuple(rows), transformer.kv_shape(length), jnp.dtype(transformer.dtype))


def _token_rows(cache: _OncePerCall, rows: list[jax.Array | None], length: int) -> jax.Array:
    """Batch-1 reference tokens per row (None: none) as (rows, length, C), zero-padded and stacked;
    a single row already `length` long is used as it is."""
    if len(rows) == 1 and rows[0] is not None and rows[0].shape[1] == length:
        return rows[0]
    return _stack_tokens(tuple(rows), (1, length, cache.transformer.config.in_channels))


def _padded(array: jax.Array, axis: int, length: int) -> jax.Array:
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, length - array.shape[axis])
    return jnp.pad(array, pad)


# One program per batch's row shapes (op by op, every pad, zero block and concatenation was a
# program of its own, traced and looked up in the compile cache again by every run).


@functools.partial(jax.jit, static_argnums=(1, 2))
def _stack_kv(rows: tuple[ReferenceKV | None, ...], shapes: tuple[tuple[int, ...], ...], dtype) -> ReferenceKV:
    length = shapes[0][3]
    parts = [
        ReferenceKV(*(jnp.zeros(shape, dtype) for shape in shapes))
        if row is None
        else ReferenceKV(*(_padded(a, 3, length) for a in row))
        for row in rows
    ]
    return ReferenceKV(*(jnp.concatenate(arrays, axis=1) for arrays in zip(*parts)))


@functools.partial(jax.jit, static_argnums=1)
def _stack_tokens(rows: tuple[jax.Array | None, ...], shape: tuple[int, int, int]) -> jax.Array:
    parts = [jnp.zeros(shape, jnp.float32) if row is None else _padded(row, 1, shape[1]) for row in rows]
    return jnp.concatenate(parts, axis=0)
