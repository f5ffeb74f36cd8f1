"""The embedded tiny model: a complete, random, diffusers-layout FLUX.2 [klein] KV pipeline folder.

It lets `flowgen run` work out of the box (quickstart, CI, end-to-end tests) with no download: the
folder has exactly the files a real Klein repo has (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/) with the real tensor names, only tiny. It is written with
numpy + safetensors alone (no torch, no diffusers), deterministically from a seed: the same seed
gives byte-identical files on every machine.

Random weights are scaled so the model is numerically lively — images are not flat grey, and prompts
and reference images visibly change them — because a model that ignores its inputs would let a
broken pipeline pass.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from flowgen.engine.transformer.config import Flux2Config
from flowgen.engine.transformer.keys import diffusers_shapes, expected_bfl_shapes
from flowgen.engine.vae.config import VAEConfig
from flowgen.engine.vae.keys import diffusers_shapes as vae_shapes

# Bump when the bytes written for a seed change (weight init, layout, configs): it is part of the
# model's identity and of its cache folder name, so stale cached copies are never reused.
FORMAT_VERSION = 1

# Architecture. Latent/token channels are the real ones (32 -> 128 after 2x2 patchify) and the VAE
# keeps 4 levels, so pixels per token stay 16 and every shape rule of the real model holds.
QWEN = dict(hidden=32, layers=28, heads=2, kv_heads=1, head_dim=16, intermediate=64)  # 28: layers 9/18/27 are read
TRANSFORMER = Flux2Config(
    hidden_size=64,
    num_heads=2,
    depth=1,
    depth_single_blocks=2,
    context_in_dim=3 * QWEN["hidden"],
    axes_dim=(8, 8, 8, 8),
)
VAE = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
TOKENIZER_VOCAB = 384
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
MODEL_INDEX = {
    "_class_name": "Flux2KleinKVPipeline",
    "is_distilled": True,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses files without it


def write_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline folder (created if missing; existing files are overwritten). Returns it."""
    # Imported here: the tokenizer is trained on the spot and only needed when writing.
    from flowgen.engine.text.tiny_tokenizer import write_tiny_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "model_index.json", MODEL_INDEX)
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    tokenizer_ids = _special_ids(write_tiny_tokenizer(folder / "tokenizer", vocab_size=TOKENIZER_VOCAB))

    _write_json(folder / "transformer" / "config.json", TRANSFORMER.to_diffusers())
    _save(folder / "transformer" / "diffusion_pytorch_model.safetensors", _transformer_weights(seed))

    vae_config = {"_class_name": "AutoencoderKLFlux2", **VAE.to_diffusers()}
    _write_json(folder / "vae" / "config.json", vae_config)
    _save(folder / "vae" / "diffusion_pytorch_model.safetensors", _vae_weights(seed))

    _write_json(folder / "text_encoder" / "config.json", _qwen_config(tokenizer_ids))
    _save(folder / "text_encoder" / "model.safetensors", _qwen_weights(seed))
    return folder


def identity(seed: int = 0) -> dict:
    """What determines the tiny model's bytes: format version, seed and architecture (cheap, for manifests)."""
    spec = json.dumps(
        {
            "format": FORMAT_VERSION,
            "seed": seed,
            "transformer": TRANSFORMER.to_diffusers(),
            "vae": VAE.to_diffusers(),
            "qwen": QWEN,
            "tokenizer_vocab": TOKENIZER_VOCAB,
        },
        sort_keys=True,
    )
    return {"format": FORMAT_VERSION, "seed": seed, "spec_sha256": hashlib.sha256(spec.encode()).hexdigest()}


def sizes() -> dict:
    """The architecture in a few numbers (the tiny model card lists the same, and is checked against it)."""
    return {
        "hidden": TRANSFORMER.hidden_size,
        "heads": TRANSFORMER.num_heads,
        "double_blocks": TRANSFORMER.depth,
        "single_blocks": TRANSFORMER.depth_single_blocks,
        "text_hidden": QWEN["hidden"],
        "text_layers": QWEN["layers"],
        "vae_channels": list(VAE.block_out_channels),
    }


# ---------------------------------------------------------------------------------------------
# tensors


class _Init:
    """Per-tensor random streams: a tensor's values depend only on (seed, component, name)."""

    def __init__(self, seed: int, component: str):
        self.seed, self.component = seed, component

    def rng(self, name: str) -> np.random.Generator:
        key = zlib.crc32(f"{self.component}/{name}".encode())
        return np.random.default_rng([self.seed, key])

    def linear(self, name: str, shape: tuple[int, ...], gain: float = 1.0) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (self.rng(name).standard_normal(shape) * gain / np.sqrt(fan_in)).astype(np.float32)

    def around(self, name: str, shape: tuple[int, ...], center: float, spread: float) -> np.ndarray:
        return (center + spread * self.rng(name).uniform(-1.0, 1.0, shape)).astype(np.float32)


def _transformer_weights(seed: int) -> dict[str, np.ndarray]:
    init, out = _Init(seed, "transformer"), {}
    for name, shape in sorted(diffusers_shapes(expected_bfl_shapes(TRANSFORMER)).items()):
        if "norm_q" in name or "norm_k" in name or "norm_added" in name:
            out[name] = init.around(name, shape, 1.75, 1.25)  # spread QK scales: peaky, input-driven attention
        elif "modulation" in name or "norm_out" in name:
            out[name] = init.linear(name, shape, gain=1.5)  # strong shift/scale/gate: timestep matters
        elif name.startswith("proj_out"):
            out[name] = init.linear(name, shape, gain=2.0)  # velocities of order 1
        else:
            out[name] = init.linear(name, shape, gain=1.4)
    return out


def _vae_weights(seed: int) -> dict[str, np.ndarray]:
    init, out = _Init(seed, "vae"), {}
    shapes = dict(vae_shapes(VAE), **{"bn.num_batches_tracked": ()})  # a BatchNorm buffer diffusers expects
    for name, shape in sorted(shapes.items()):
        if name == "bn.num_batches_tracked":
            out[name] = np.zeros((), np.int64)
            continue
        if name == "bn.running_mean":
            out[name] = (0.5 * init.rng(name).standard_normal(shape)).astype(np.float32)
        elif name == "bn.running_var":
            out[name] = init.around(name, shape, 1.25, 0.75)  # 0.5 .. 2.0
        elif name.endswith(".bias"):
            out[name] = (0.05 * init.rng(name).standard_normal(shape)).astype(np.float32)
        elif len(shape) == 1:  # GroupNorm scales
            out[name] = init.around(name, shape, 1.0, 0.2)
        else:
            out[name] = init.linear(name, shape, gain=1.0)
    return out


def _qwen_weights(seed: int) -> dict[str, np.ndarray]:
    init, out = _Init(seed, "text_encoder"), {}
    hid, hd = QWEN["hidden"], QWEN["head_dim"]
    q, kv, mlp = QWEN["heads"] * hd, QWEN["kv_heads"] * hd, QWEN["intermediate"]
    shapes = {
        "model.embed_tokens.weight": (TOKENIZER_VOCAB, hid),
        "model.norm.weight": (hid,),
        "lm_head.weight": (TOKENIZER_VOCAB, hid),
    }
    for n in range(QWEN["layers"]):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hid,),
                p + "post_attention_layernorm.weight": (hid,),
                p + "self_attn.q_proj.weight": (q, hid),
                p + "self_attn.k_proj.weight": (kv, hid),
                p + "self_attn.v_proj.weight": (kv, hid),
                p + "self_attn.o_proj.weight": (hid, q),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate_proj.weight": (mlp, hid),
                p + "mlp.up_proj.weight": (mlp, hid),
                p + "mlp.down_proj.weight": (hid, mlp),
            }
        )
    for name, shape in sorted(shapes.items()):
        if name == "model.embed_tokens.weight":
            out[name] = init.rng(name).standard_normal(shape).astype(np.float32)
        elif "q_norm" in name or "k_norm" in name:
            out[name] = init.around(name, shape, 1.75, 1.25)
        elif len(shape) == 1:
            out[name] = init.around(name, shape, 1.0, 0.2)
        else:
            out[name] = init.linear(name, shape, gain=0.7)  # 28 residual layers: keep the stream bounded
    return out


def _qwen_config(token_ids: dict[str, int]) -> dict:
    """A Qwen3ForCausalLM config.json in the style of the released Qwen3 files."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "head_dim": QWEN["head_dim"],
        "hidden_act": "silu",
        "hidden_size": QWEN["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": QWEN["intermediate"],
        "max_position_embeddings": 1024,
        "max_window_layers": QWEN["layers"],
        "model_type": "qwen3",
        "num_attention_heads": QWEN["heads"],
        "num_hidden_layers": QWEN["layers"],
        "num_key_value_heads": QWEN["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": TOKENIZER_VOCAB,
    }


def _special_ids(tokenizer_folder: Path) -> dict[str, int]:
    data = json.loads((tokenizer_folder / "tokenizer.json").read_text())
    return {token["content"]: token["id"] for token in data["added_tokens"]}


def _save(path: Path, tensors: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=_SAFETENSORS_METADATA)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
