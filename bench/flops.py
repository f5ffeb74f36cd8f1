"""Arithmetic of the FLUX.2 [klein] DiT, shared by the benchmarks (what a row computes, not how fast).

Counts the block matmuls (projections and SwiGLU MLP; a double and a single block cost the same per
token) and attention (q·kᵀ and p·v); embeddings, norms and modulation are < 1 % and left out.
"""

from __future__ import annotations

from flowgen.engine.transformer.config import Flux2Config


def block_flops(cfg: Flux2Config, rows: int, keys: int) -> float:
    """One block for `rows` query tokens attending over `keys` tokens."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    linear = 2 * rows * (3 * h * h + h * h + 3 * m * h)  # qkv, out proj, SwiGLU in (2M) and out (M)
    return linear + 4 * rows * keys * h


def step_flops(cfg: Flux2Config, rows: int, keys: int) -> float:
    """Every block of one step."""
    return (cfg.depth + cfg.depth_single_blocks) * block_flops(cfg, rows, keys)
