"""Reference images -> what the transformer needs, computed once per distinct content.

A reference *set* (an item's ordered list of images) is keyed by the content of its prepared
pixels, so equal images given as different objects (or paths) share work:

* each image is VAE-encoded on its own (batch 1), so its latents never depend on batch mates;
* the KV model's reference pre-pass runs once per distinct set and is kept for the next batches
  (the K/V depend on nothing else: not prompt, noise, step or text length).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flowgen.engine.ids import pack, reference_ids
from flowgen.engine.images import MAX_REFERENCES, prepare_references
from flowgen.engine.prompt_cache import LRU
from flowgen.errors import ImageInputError


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
    """A reference set as the transformer sees it: packed tokens (1, R, C) and their ids (R, 4)."""

    tokens: jax.Array
    ids: np.ndarray


def prepare_set(images: Sequence, *, label: str = "") -> PreparedSet:
    """Prepare one item's references (PIL images, paths, or uint8 (H, W[, 3|4]) arrays) as diffusers does."""
    if len(images) > MAX_REFERENCES:
        raise ImageInputError(f"{label}{len(images)} reference images given; at most {MAX_REFERENCES} are allowed")
    prepared = prepare_references([_as_pil(image, index, label) for index, image in enumerate(images)])
    keys = tuple(_content_key(p) for p in prepared)
    return PreparedSet(tuple(prepared), keys)


class ReferenceCache:
    """Per-image latents and per-set KV pre-passes, with counters for tests and timings."""

    def __init__(self, vae, transformer, *, latent_capacity: int = 64, kv_capacity: int = 2,
                 counters: collections.Counter | None = None):
        self.vae = vae
        self.transformer = transformer
        self._latents = LRU(latent_capacity)
        self._kv = LRU(kv_capacity)
        self.counters = counters if counters is not None else collections.Counter()

    def tokens(self, refs: PreparedSet) -> ReferenceTokens:
        """All of a set's reference tokens, concatenated in order, with t = 10·(k+1) ids."""
        packed, sizes = [], []
        for image, key in zip(refs.images, refs.keys):
            latents = self._latents.get_or_make(key, lambda image=image: self._encode(image))
            sizes.append(latents.shape[2:])
            packed.append(pack(latents))
        return ReferenceTokens(jnp.concatenate(packed, axis=1), reference_ids(sizes))

    def kv(self, refs: PreparedSet):
        """The KV model's cached reference K/V for this set (batch 1), pre-pass run once per set."""
        return self._kv.get_or_make(refs.key, lambda: self._prepass(refs))

    def clear(self) -> None:
        """Forget cached latents and K/V."""
        self._latents.clear()
        self._kv.clear()

    def _encode(self, image: np.ndarray) -> jax.Array:
        self.counters["vae_encode"] += 1
        return self.vae.encode(image[None])

    def _prepass(self, refs: PreparedSet):
        self.counters["reference_prepass"] += 1
        ref = self.tokens(refs)
        return self.transformer.reference_kv(ref.tokens, ref.ids)


def _as_pil(image, index: int, label: str):
    """PIL images and paths pass through; numpy arrays (uint8 pixels) become PIL images."""
    if not isinstance(image, np.ndarray):
        return image
    name = f"{label}reference #{index + 1}"
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ImageInputError(f"{name}: arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4); got "
                              f"{image.dtype} {image.shape}")
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)


def _content_key(pixels: np.ndarray) -> str:
    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()
