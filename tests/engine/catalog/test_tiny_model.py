"""The embedded tiny model must be a real diffusers Klein KV pipeline folder, deterministic and lively."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from flowgen.engine.catalog import tiny_model

# sha256 over the weight and config files written for seed 0 (tokenizer excluded: it belongs to
# tiny_tokenizer.py). If this changes, the bytes changed: bump tiny_model.FORMAT_VERSION, then update.
GOLDEN = {"format": 1, "sha256": "22cb96a12109ebe015991f934117f38cb37f36238e66d84023e3bc80496a2943"}


def _digest(folder, exclude=("tokenizer",)) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.relative_to(folder).parts[0] not in exclude}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model.write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_layout(folder):
    names = {str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()}
    assert {"model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= names


def test_deterministic(folder, tmp_path):
    again = tiny_model.write_tiny_model(tmp_path / "again", seed=0)
    assert _digest(folder, exclude=()) == _digest(again, exclude=())
    other = tiny_model.write_tiny_model(tmp_path / "other", seed=1)
    changed = {k for k, v in _digest(other).items() if _digest(folder)[k] != v}
    assert changed == {"transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                       "text_encoder/model.safetensors"}
    combined = hashlib.sha256(repr(sorted(_digest(folder).items())).encode()).hexdigest()
    assert tiny_model.FORMAT_VERSION == GOLDEN["format"]
    assert combined == GOLDEN["sha256"], "tiny model bytes changed: bump FORMAT_VERSION and GOLDEN"


def _assert_clean_load(model, info, files):
    from safetensors.numpy import load_file

    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    written = {}
    for f in files:
        written.update({k: v.shape for k, v in load_file(f).items()})
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state == written


def test_components_load_with_no_missing_or_unexpected_keys(folder):
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    transformer, info = Flux2Transformer2DModel.from_pretrained(folder / "transformer", output_loading_info=True)
    _assert_clean_load(transformer, info, [folder / "transformer/diffusion_pytorch_model.safetensors"])
    vae, info = AutoencoderKLFlux2.from_pretrained(folder / "vae", output_loading_info=True)
    _assert_clean_load(vae, info, [folder / "vae/diffusion_pytorch_model.safetensors"])
    assert vae.bn.running_var.std() > 0.1 and vae.bn.running_mean.abs().mean() > 0.1  # non-trivial latent stats
    encoder, info = Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", output_loading_info=True)
    _assert_clean_load(encoder, info, [folder / "text_encoder/model.safetensors"])
    assert encoder.config.num_hidden_layers >= 28
    assert transformer.config.joint_attention_dim == 3 * encoder.config.hidden_size
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    assert max(tokenizer.get_vocab().values()) < encoder.config.vocab_size


@pytest.mark.slow
def test_pipeline_runs_and_is_lively(folder):
    import torch
    from diffusers import Flux2KleinKVPipeline
    from PIL import Image

    pipe = Flux2KleinKVPipeline.from_pretrained(folder)
    rng = np.random.default_rng(0)
    reference = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))

    embeds = {p: pipe.encode_prompt(p, device="cpu")[0] for p in ("a red fox in the snow", "a blue whale at sea")}

    def generate(prompt, image=None):
        out = pipe(prompt_embeds=embeds[prompt], image=image, height=128, width=128, num_inference_steps=4,
                   generator=torch.Generator().manual_seed(0), output_type="np")
        return out.images[0]

    def psnr(a, b):
        return 10 * np.log10(1.0 / np.mean((a - b) ** 2))

    plain = generate("a red fox in the snow")
    assert plain.shape == (128, 128, 3) and plain.std() > 0.1  # not flat grey
    assert psnr(plain, generate("a blue whale at sea")) < 30  # the prompt matters
    assert psnr(plain, generate("a red fox in the snow", image=[reference])) < 30  # references matter
