"""4-axis rotary position embedding (RoPE) of FLUX.2.

Angles are computed on the host in float64 (like diffusers) and handed to the jitted model as
float32 (cos, sin) tables of shape (N, head_dim/2); the rotation acts on interleaved pairs
(x[2i], x[2i+1]). Axis a of the 4-vector id owns `axes_dim[a]` consecutive head dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def rope_tables(ids, axes_dim: Sequence[int], theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 tables of shape (N, sum(axes_dim)/2) for integer ids of shape (N, len(axes_dim))."""
    ids = np.asarray(ids)
    if ids.ndim == 3:  # (B, N, 4) as the pipelines pass them; ids are shared over the batch
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[-1] < len(axes_dim):
        raise ValueError(f"position ids must have shape (N, {len(axes_dim)}), got {ids.shape}")
    pos = ids.astype(np.float64)
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles.append(pos[:, axis : axis + 1] * omega[None, :])
    angle = np.concatenate(angles, axis=-1)
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs of x (B, heads, N, D) by tables (N, D/2), or per row (B, N, D/2);
    computed in float32, returned in x.dtype."""
    if cos.ndim == 3:  # per-row tables (rows with different reference layouts): broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
