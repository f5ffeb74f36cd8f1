"""Reference images -> what the transformer needs, computed once per distinct content.

A reference *set* (an item's ordered list of images) is keyed by the content of its prepared
pixels, so equal images given as different objects (or paths) share work:

* each image is VAE-encoded on its own (batch 1), so its latents never depend on batch mates; a
  set's new images are encoded side by side on the CPU's cores (`runtime/host_threads.py`);
* the latents and K/V kept are bounded by bytes (LATENT_CACHE_BYTES, KV_CACHE_BYTES), not by count:
  one 9B set's K/V is 2 GiB, a tiny model's a few KiB;
* the KV model's reference pre-pass runs once per distinct set and weights (a LoRA set changes
  the K/V; `use_weights`) and is kept for the next batches (the K/V depend on nothing else: not
  prompt, noise, step or text length);
* token counts are padded up to a length bucket (`length_bucket`) and the padding masked, so the
  pre-pass and the sampling loop compile once per bucket, not once per reference size, and a set's
  K/V can be stacked with any other set's in one batch. A set always pre-passes at its own bucket,
  so its K/V never depend on the batch it meets.
"""

from __future__ import annotations

import collections
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flowgen.engine.byte_lru import ByteLRU
from flowgen.engine.references.images import MAX_REFERENCES, prepare_references
from flowgen.engine.runtime.host_threads import side_by_side
from flowgen.engine.transformer.model import ReferenceKV
from flowgen.engine.transformer.positions import pack, reference_ids
from flowgen.errors import ImageInputError

# Device memory the cache may hold. Latents: 2 MiB per 1 MP reference in float32, so 64 of them.
# K/V: two 1 MP 9B sets in bfloat16 (2 GiB each, as the two-set cache held before); a set larger
# than the whole budget (four 1 MP references: 8 GiB) is still kept until the next set arrives,
# since pre-passing it again for every batch that shares it costs more than holding it.
LATENT_CACHE_BYTES = 128 * 1024 * 1024
KV_CACHE_BYTES = 4 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class PreparedSet:
    """One item's references after preparation: (H, W, 3) float32 arrays in [-1, 1] and their keys."""

    images: tuple[np.ndarray, ...]
    keys: tuple[str, ...]

    @property
    def key(self) -> tuple[str, ...]:
        return self.keys

    @property
    def first_size(self) -> tuple[int, int] | None:
        """(height, width) of the first prepared reference (the default output size)."""
        return tuple(self.images[0].shape[:2]) if self.images else None


@dataclass
class ReferenceTokens:
    """A reference set as the transformer sees it: packed tokens (1, R, C) and their ids (R, 4).

    When padded, R is a length bucket and only the first `length` tokens are real (the padding is
    zero tokens with zero ids, always masked)."""

    tokens: jax.Array
    ids: np.ndarray
    length: int


@dataclass
class CachedKV:
    """A set's pre-passed K/V (batch 1), padded along the key axis to a bucket; `length` keys are real."""

    kv: ReferenceKV
    length: int

    @property
    def padded_length(self) -> int:
        return int(self.kv.double_k.shape[3])


# Token counts a reference set is padded to: 64 then four steps per octave (2^k · 1, 1.25, 1.5,
# 1.75) up to 16384 (four 1024² references), so padding costs at most 25% of the reference tokens
# and a whole run compiles at most 33 reference lengths; beyond, multiples of 4096.
_BUCKET_FLOOR, _BUCKET_OCTAVE_TOP = 64, 16384
_BUCKET_COARSE = 4096


def length_bucket(tokens: int) -> int:
    """The padded token count for a reference set of `tokens` tokens (0 stays 0)."""
    if tokens <= 0:
        return 0
    if tokens <= _BUCKET_FLOOR:
        return _BUCKET_FLOOR
    if tokens > _BUCKET_OCTAVE_TOP:
        return -(-tokens // _BUCKET_COARSE) * _BUCKET_COARSE
    octave = 1 << (tokens - 1).bit_length() - 1  # largest power of two < tokens
    quarter = octave // 4
    return octave + -(-(tokens - octave) // quarter) * quarter


def bucket_lengths() -> list[int]:
    """Every bucket up to 16384 (for docs and tests)."""
    return sorted({length_bucket(n) for n in range(1, _BUCKET_OCTAVE_TOP + 1)})


def prepare_set(images: Sequence, *, label: str = "") -> PreparedSet:
    """Prepare one item's references (PIL images, paths, or uint8 (H, W[, 3|4]) arrays) as diffusers does."""
    if len(images) > MAX_REFERENCES:
        raise ImageInputError(f"{label}{len(images)} reference images given; at most {MAX_REFERENCES} are allowed")
    prepared = prepare_references([_as_pil(image, index, label) for index, image in enumerate(images)])
    keys = tuple(_content_key(p) for p in prepared)
    return PreparedSet(tuple(prepared), keys)


class ReferenceCache:
    """Per-image latents and per-set KV pre-passes, with counters for tests and timings."""

    def __init__(
        self,
        vae,
        transformer,
        *,
        latent_bytes: int = LATENT_CACHE_BYTES,
        kv_bytes: int = KV_CACHE_BYTES,
        counters: collections.Counter | None = None,
    ):
        self.vae = vae
        self.transformer = transformer
        self._latents: ByteLRU[jax.Array] = ByteLRU(latent_bytes, _nbytes)
        self._kv: ByteLRU[CachedKV] = ByteLRU(
            kv_bytes, lambda cached: sum(_nbytes(a) for a in cached.kv), keep_newest=True
        )
        self.counters = counters if counters is not None else collections.Counter()
        self._weights_key: tuple = ()  # identifies the transformer weights in use: () = as loaded
        self._params = None  # those weights (None: the transformer's own)

    def use_weights(self, key: tuple, params) -> None:
        """Pre-pass with `params` from now on; `key` identifies them (e.g. the merged LoRA set)."""
        self._weights_key, self._params = tuple(key), params

    def tokens(self, refs: PreparedSet) -> ReferenceTokens:
        """All of a set's reference tokens, concatenated in order, with t = 10·(k+1) ids, padded to
        the set's length bucket."""
        missing = {key: image for image, key in zip(refs.images, refs.keys) if key not in self._latents}
        made = dict(zip(missing, side_by_side(self._encode, list(missing.values()))))  # at once on CPU cores
        latents, sizes = [], []
        for image, key in zip(refs.images, refs.keys):
            if key in made:
                one = made[key]
                self._latents.put(key, one)
            else:
                one = self._latents.get_or_make(key, functools.partial(self._encode, image))
            height, width = one.shape[2:]
            sizes.append((height, width))
            latents.append(one)
        length = sum(height * width for height, width in sizes)
        bucket = length_bucket(length)
        return ReferenceTokens(_set_tokens(tuple(latents), bucket), padded_ids(reference_ids(sizes), bucket), length)

    def kv(self, refs: PreparedSet) -> CachedKV:
        """The KV model's cached reference K/V for this set (batch 1, padded to its bucket), pre-pass
        run once per set."""
        return self._kv.get_or_make((self._weights_key, refs.key), lambda: self._prepass(refs))

    def clear(self) -> None:
        """Forget cached latents and K/V."""
        self._latents.clear()
        self._kv.clear()

    @property
    def cached_bytes(self) -> int:
        """Device memory the cached latents and K/V hold."""
        return self._latents.nbytes + self._kv.nbytes

    def _encode(self, image: np.ndarray) -> jax.Array:
        self.counters["vae_encode"] += 1
        return self.vae.encode(image[None])

    def _prepass(self, refs: PreparedSet) -> CachedKV:
        self.counters["reference_prepass"] += 1
        ref = self.tokens(refs)
        lengths = None if ref.length == ref.tokens.shape[1] else np.array([ref.length], np.int32)
        return CachedKV(self.transformer.reference_kv(ref.tokens, ref.ids, lengths, params=self._params), ref.length)


def padded_ids(ids: np.ndarray, size: int) -> np.ndarray:
    """Position ids (R, 4) with zero ids appended up to `size` rows (padding tokens)."""
    extra = size - ids.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad {ids.shape[0]} reference tokens down to {size}")
    return np.concatenate([ids, np.zeros((extra, ids.shape[1]), ids.dtype)])


@functools.partial(jax.jit, static_argnums=1)
def _set_tokens(latents: tuple[jax.Array, ...], length: int) -> jax.Array:
    """A set's latents (1, C, h, w) each -> its tokens (1, length, C): packed, concatenated in order
    and zero-padded to `length`, in one program (op by op, each op was a program of its own)."""
    tokens = jnp.concatenate([pack(one) for one in latents], axis=1)
    return jnp.pad(tokens, ((0, 0), (0, length - tokens.shape[1]), (0, 0)))


def _as_pil(image, index: int, label: str):
    """PIL images and paths pass through; numpy arrays (uint8 pixels) become PIL images."""
    if not isinstance(image, np.ndarray):
        return image
    name = f"{label}reference #{index + 1}"
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ImageInputError(
            f"{name}: arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} {image.shape}"
        )
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)


def _nbytes(array) -> int:
    return int(array.size) * array.dtype.itemsize


def _content_key(pixels: np.ndarray) -> str:
    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()
