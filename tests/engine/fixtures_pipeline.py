"""A tiny, sensitive, complete diffusers FLUX.2 [klein] pipeline folder for end-to-end parity tests.

Everything is built with the reference libraries themselves and written with `save_pretrained`:
a sharpened Flux2Transformer2DModel, an AutoencoderKLFlux2 with non-trivial BatchNorm statistics,
a 28-layer Qwen3ForCausalLM (hidden 32), flowgen's tiny tokenizer wrapped by transformers'
AutoTokenizer, and a FlowMatchEulerDiscreteScheduler with the Klein config. The same modules are
saved three times, as the KV pipeline, the distilled plain pipeline and the base (CFG) pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowgen.engine.catalog.tiny_model import SCHEDULER_CONFIG
from flowgen.engine.text.tiny_tokenizer import write_tiny_tokenizer
from flowgen.engine.transformer.config import Flux2Config
from tests.engine.fixtures_text import TINY_VOCAB, write_tiny_text_encoder

QWEN_HIDDEN = 32  # fixtures_text.TINY_QWEN3
TRANSFORMER = Flux2Config(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                          context_in_dim=3 * QWEN_HIDDEN, axes_dim=(8, 8, 8, 8))
VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=32)
MAX_SEQUENCE_LENGTH = 32
KINDS = ("kv", "distilled", "base")


def sharpen_vae_(model, seed: int = 1) -> None:
    """Affine GroupNorms, biases that matter, peaked attention and BatchNorm stats far from (0, 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif ".to_q." in name or ".to_k." in name:
                p.mul_(4.0)
        c = model.bn.running_mean.shape[0]
        model.bn.running_mean.copy_(torch.randn(c, generator=gen))
        model.bn.running_var.copy_(0.5 + 2.5 * torch.rand(c, generator=gen))


def sharpen_transformer_(model, seed: int = 0) -> None:
    """Re-initialise every weight at unit gain (diffusers' default init leaves the blocks' gated
    updates so small that prompts and references barely move the velocity): projections
    N(0, gain²/fan_in), QK-norm scales in [0.5, 3] (peaky attention), strong modulation."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # QK RMSNorm scales
                p.copy_(0.5 + 2.5 * torch.rand(p.shape, generator=gen))
                continue
            gain = 1.5 if ("modulation" in name or "norm_out" in name) else 2.0 if name.startswith("proj_out") else 1.4
            p.copy_(torch.randn(p.shape, generator=gen) * gain / p.shape[1] ** 0.5)


def write_tiny_pipelines(root: str | Path, seed: int = 0) -> tuple[dict[str, Path], dict]:
    """Save the three pipeline folders under `root`.

    Returns ({kind: folder}, {kind: the diffusers pipeline object that was saved}); each pipeline
    has its own transformer copy, as the KV pipeline swaps attention processors in place.
    """
    import copy

    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinKVPipeline,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import AutoTokenizer

    root = Path(root)
    torch.manual_seed(seed)
    config = dict(TRANSFORMER.to_diffusers())
    config.pop("_class_name")
    transformer = Flux2Transformer2DModel(**config).eval()
    sharpen_transformer_(transformer, seed)
    vae = AutoencoderKLFlux2(**VAE).eval()
    sharpen_vae_(vae, seed + 1)
    text_encoder = write_tiny_text_encoder(root / "_text_encoder", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(write_tiny_tokenizer(root / "_tokenizer", vocab_size=TINY_VOCAB))
    scheduler_config = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}

    def parts():
        return dict(scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config), vae=vae,
                    text_encoder=text_encoder, tokenizer=tokenizer, transformer=copy.deepcopy(transformer))

    pipes = {
        "kv": Flux2KleinKVPipeline(**parts()),
        "distilled": Flux2KleinPipeline(**parts(), is_distilled=True),
        "base": Flux2KleinPipeline(**parts(), is_distilled=False),
    }
    folders = {kind: root / kind for kind in KINDS}
    for kind, pipe in pipes.items():
        pipe.save_pretrained(folders[kind])
        pipe.set_progress_bar_config(disable=True)
    return folders, pipes


def reference_images(sizes: list[tuple[int, int]], seed: int = 0):
    """Smooth random RGB PIL images of (width, height) sizes: structure a VAE can see."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        pixels = np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:height, :width]
        images.append(Image.fromarray(pixels.copy()))
    return images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (or stacks); inf when identical."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
