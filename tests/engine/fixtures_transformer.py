"""A tiny, sharpened FLUX.2 transformer for parity tests: its config, the diffusers -> BFL key renaming
(test-local, so a mistake in flowgen's own renaming cannot hide), a sharpening that makes a wrong port
fail visibly, and diffusers' KV attention processors."""

from __future__ import annotations

import numpy as np

from flowgen.engine.transformer.config import Flux2Config

TINY = Flux2Config(
    hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=48, axes_dim=(8, 8, 8, 8)
)


def diffusers_to_bfl(sd) -> dict[str, np.ndarray]:
    """Test-local diffusers -> BFL renaming (re-fuse q/k/v, swap the final (scale, shift) halves)."""
    sd = {k: np.asarray(v) for k, v in sd.items()}
    out = {
        "img_in.weight": sd.pop("x_embedder.weight"),
        "txt_in.weight": sd.pop("context_embedder.weight"),
        "time_in.in_layer.weight": sd.pop("time_guidance_embed.timestep_embedder.linear_1.weight"),
        "time_in.out_layer.weight": sd.pop("time_guidance_embed.timestep_embedder.linear_2.weight"),
        "final_layer.linear.weight": sd.pop("proj_out.weight"),
    }
    for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        out[f"{name}.lin.weight"] = sd.pop(f"{name}.linear.weight")
    scale, shift = np.split(sd.pop("norm_out.linear.weight"), 2, axis=0)
    out["final_layer.adaLN_modulation.1.weight"] = np.concatenate([shift, scale], axis=0)
    double = {
        "img_attn.proj.weight": "attn.to_out.0.weight",
        "txt_attn.proj.weight": "attn.to_add_out.weight",
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
        "img_mlp.0.weight": "ff.linear_in.weight",
        "img_mlp.2.weight": "ff.linear_out.weight",
        "txt_mlp.0.weight": "ff_context.linear_in.weight",
        "txt_mlp.2.weight": "ff_context.linear_out.weight",
    }
    single = {
        "linear1.weight": "attn.to_qkv_mlp_proj.weight",
        "linear2.weight": "attn.to_out.weight",
        "norm.query_norm.scale": "attn.norm_q.weight",
        "norm.key_norm.scale": "attn.norm_k.weight",
    }
    i = 0
    while f"transformer_blocks.{i}.attn.to_q.weight" in sd:
        p = f"transformer_blocks.{i}."
        out[f"double_blocks.{i}.img_attn.qkv.weight"] = np.concatenate(
            [sd.pop(p + f"attn.to_{n}.weight") for n in "qkv"], axis=0
        )
        out[f"double_blocks.{i}.txt_attn.qkv.weight"] = np.concatenate(
            [sd.pop(p + f"attn.add_{n}_proj.weight") for n in "qkv"], axis=0
        )
        for bfl, dif in double.items():
            out[f"double_blocks.{i}.{bfl}"] = sd.pop(p + dif)
        i += 1
    j = 0
    while f"single_transformer_blocks.{j}.attn.to_out.weight" in sd:
        for bfl, dif in single.items():
            out[f"single_blocks.{j}.{bfl}"] = sd.pop(f"single_transformer_blocks.{j}.{dif}")
        j += 1
    assert not sd, f"unmapped diffusers keys: {sorted(sd)}"
    return out


def sharpen_(module, seed: int = 0) -> None:
    """Make a wrong port fail visibly: spread-out QK-norm scales (peaky attention), larger outputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and p.ndim == 1:  # QK RMSNorm scales
                p.copy_(0.5 + 2.5 * torch.rand(p.shape, generator=gen))
            elif any(s in name for s in ("to_out", "to_add_out", "linear_out", "proj_out")):
                p.mul_(2.0)
            elif "modulation" in name or "norm_out" in name:
                p.mul_(1.5)


def set_kv_processors(model) -> None:
    """Exactly what Flux2KleinKVPipeline._set_kv_attn_processors does (else diffusers ignores KV args)."""
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
