"""Position ids and token packing for FLUX.2 [klein], built exactly as the reference pipelines do.

Every token carries a 4-vector `(t, h, w, l)`: text uses only `l`, image tokens use `h`/`w`, and
reference images are told apart only by `t = 10·(k+1)` (their `h`/`w` restart at 0).
Ids are numpy int64, flattened row-major (t, then h, then w, then l), like `torch.cartesian_prod`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REFERENCE_T_SCALE = 10


def _grid(t: int, h: int, w: int, seq: int) -> np.ndarray:
    """Cartesian product of [t] × arange(h) × arange(w) × arange(seq) as (n, 4) int64 (FLUX.2's t, h, w, l axes)."""
    axes = np.meshgrid(np.asarray([t]), np.arange(h), np.arange(w), np.arange(seq), indexing="ij")
    return np.stack([a.reshape(-1) for a in axes], axis=-1).astype(np.int64)


def text_ids(num_tokens: int) -> np.ndarray:
    """Ids of `num_tokens` text tokens: (0, 0, 0, l) for l = 0..T-1. Shape (T, 4)."""
    return _grid(0, 1, 1, num_tokens)


def image_ids(h: int, w: int, t: int = 0) -> np.ndarray:
    """Ids of an h×w token grid (latent size / 2 per side): (t, i, j, 0), row-major. Shape (h·w, 4)."""
    return _grid(t, h, w, 1)


def reference_ids(sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Ids of reference token grids [(h0, w0), (h1, w1), ...] concatenated; reference k gets t = 10·(k+1)."""
    if not sizes:
        return np.zeros((0, 4), np.int64)
    return np.concatenate([image_ids(h, w, t=REFERENCE_T_SCALE * (k + 1)) for k, (h, w) in enumerate(sizes)], axis=0)


def pack(latents):
    """(B, C, h, w) patchified latents -> (B, h·w, C) tokens (row-major). Works on numpy and jax arrays."""
    b, c, h, w = latents.shape
    return latents.transpose(0, 2, 3, 1).reshape(b, h * w, c)


def unpack(tokens, h: int, w: int):
    """(B, h·w, C) tokens -> (B, C, h, w) latents; inverse of `pack`."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"unpack: {n} tokens do not make a {h}x{w} grid")
    return tokens.reshape(b, h, w, c).transpose(0, 3, 1, 2)
