"""Tiny Qwen3 text-encoder folders for tests (importable by any test; torch/transformers are test-only).

`write_tiny_text_encoder(folder)` saves a sharpened random `Qwen3ForCausalLM` with transformers'
`save_pretrained` (the layout of a diffusers `text_encoder/` folder) and returns the torch model;
`write_tiny_tokenizer` (flowgen's) gives the matching `tokenizer/` folder. 28 layers is the least
that has hidden state 27; the sizes are otherwise tiny.
"""

from __future__ import annotations

from pathlib import Path

from flowgen.engine.text.tiny_tokenizer import write_tiny_tokenizer

TINY_VOCAB = 384  # tokenizer and embedding share it
TINY_QWEN3 = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=28,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_theta=1_000_000.0,
    tie_word_embeddings=False,
)


def tiny_qwen3_config(**overrides):
    """A transformers Qwen3Config with TINY_QWEN3 sizes (plus overrides)."""
    from transformers import Qwen3Config

    return Qwen3Config(**{**TINY_QWEN3, **overrides})


def sharpen_qwen3_(model, seed: int = 0) -> None:
    """Replace the near-zero default init with weights that make every part of the math matter.

    Unit-variance embeddings and fan-in-scaled projections make each layer's contribution a sizeable
    part of the residual stream (kept O(1), so float32 rounding stays far below 1e-4); norm scales spread around 1 and q/k-norm scales up to 3 make attention
    peaky, so a wrong mask, RoPE or head grouping changes the output visibly.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 2.0 * torch.rand(p.shape, generator=gen))
            elif p.ndim == 1:  # layer norms
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # (out, in) projections; the residual writers smaller so the stream stays O(1)
                gain = 0.4 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def write_tiny_text_encoder(folder: str | Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Save a sharpened tiny Qwen3ForCausalLM to `folder`; returns the (eval, float32) torch model."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(**overrides)).eval()
    sharpen_qwen3_(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


def write_tiny_text_folders(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """`root/text_encoder` and `root/tokenizer` as in a diffusers Klein repo; returns both paths."""
    root = Path(root)
    write_tiny_tokenizer(root / "tokenizer", vocab_size=TINY_VOCAB)
    write_tiny_text_encoder(root / "text_encoder", seed=seed)
    return root / "text_encoder", root / "tokenizer"
