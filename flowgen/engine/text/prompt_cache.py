"""Prompt embeddings, computed once per distinct prompt and kept for later batches.

Each prompt is tokenised and encoded on its own (batch 1, fixed length), so its embedding is the
same whichever prompts share its batch: batch composition must never change an image.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp


class LRU:
    """A small least-recently-used map (values are usually device arrays)."""

    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self._items: collections.OrderedDict = collections.OrderedDict()

    def get_or_make(self, key: Hashable, make: Callable[[], object]):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        if self.capacity:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class PromptEncoder:
    """Tokeniser + Qwen3 encoder behind a per-prompt cache: `embeddings(prompts) -> (B, T, D)`.

    `counters["text_encode"]` counts encoder calls (one per distinct prompt not yet cached).
    """

    def __init__(self, tokenizer, encoder, dtype, *, capacity: int = 32, counters: collections.Counter | None = None):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.dtype = jnp.dtype(dtype)
        self._cache = LRU(capacity)
        self.counters = counters if counters is not None else collections.Counter()

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def embed(self, prompt: str, max_length: int | None = None) -> jax.Array:
        """(1, T, D) embedding of one prompt in the pipeline dtype (cached)."""
        length = int(max_length or self.tokenizer.max_length)
        return self._cache.get_or_make((prompt, length), lambda: self._encode(prompt, length))

    def embeddings(self, prompts: Sequence[str], max_length: int | None = None) -> jax.Array:
        """(B, T, D) embeddings; each distinct prompt is encoded once (at batch 1)."""
        distinct = {p: self.embed(p, max_length) for p in dict.fromkeys(prompts)}
        if len(prompts) == 1:
            return distinct[prompts[0]]  # as it is (a concatenation of one would be a program)
        return jnp.concatenate([distinct[p] for p in prompts], axis=0)

    def clear(self) -> None:
        """Forget every cached embedding."""
        self._cache.clear()

    def _encode(self, prompt: str, length: int) -> jax.Array:
        self.counters["text_encode"] += 1
        saved = self.tokenizer.max_length
        self.tokenizer.max_length = length  # the tokenizer pads/cuts to its max_length
        try:
            ids, mask = self.tokenizer([prompt])
        finally:
            self.tokenizer.max_length = saved
        return self.encoder(ids, mask).astype(self.dtype)
