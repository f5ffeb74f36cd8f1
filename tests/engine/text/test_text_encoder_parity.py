"""Parity of flowgen's JAX Qwen3 text encoder with transformers' Qwen3ForCausalLM (float32, same weights).

Klein's embedding is hidden_states[9] ‖ [18] ‖ [27] for every row, pad rows included (the DiT reads
them all), so every row is compared. Tolerance: max |Δ| ≤ 1e-4 absolute.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

from flowgen.engine.text.qwen3 import Qwen3EncoderConfig, load_text_encoder
from flowgen.engine.text.tiny_tokenizer import write_tiny_tokenizer
from flowgen.engine.text.tokenizer import load_tokenizer
from flowgen.engine.weights.safetensors_io import LazyTensors
from flowgen.errors import CheckpointError
from tests.engine.fixtures_text import TINY_VOCAB, write_tiny_text_encoder

torch.set_grad_enabled(False)
TOL = 1e-4
MAX_LENGTH = 32
PROMPTS = ["a red apple on a table", "dog"]  # different lengths -> different padding


def reference_states(model, ids, mask, layers):
    out = model(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long),
        output_hidden_states=True,
        use_cache=False,
    )
    return torch.cat([out.hidden_states[k] for k in layers], dim=-1).float().numpy()


def assert_close(ours, reference, what: str) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} vs {reference.shape}"
    err = float(np.max(np.abs(ours - reference)))
    print(f"{what}: max|Δ| = {err:.3e} (max|ref| {np.max(np.abs(reference)):.2f})")
    assert err <= TOL, f"{what}: max |Δ| {err:.3e} > {TOL}"
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A sharpened 28-layer Qwen3ForCausalLM saved whole and sharded, its tokenizer and a batch."""
    root = tmp_path_factory.mktemp("qwen3")
    model = write_tiny_text_encoder(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="200KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 2, "sharding fixture did not shard"
    tokenizer = load_tokenizer(write_tiny_tokenizer(root / "tokenizer", vocab_size=TINY_VOCAB), MAX_LENGTH)
    ids, mask = tokenizer(PROMPTS)
    assert 0 < mask[1].sum() < mask[0].sum() < MAX_LENGTH, "both prompts must be padded, by different amounts"
    return dict(root=root, model=model, ids=ids, mask=mask, ref=reference_states(model, ids, mask, (9, 18, 27)))


def test_reference_is_sensitive(tiny):
    """A port that ignored the prompt or the key-padding mask would fail the comparisons below."""
    ids, mask, ref = tiny["ids"], tiny["mask"], tiny["ref"]
    # The two prompts share only the template's first tokens; their real rows must differ after that.
    shared = int(np.argmax(ids[0] != ids[1]))
    assert np.abs(ref[0, shared : mask[1].sum()] - ref[1, shared : mask[1].sum()]).max(axis=-1).min() > 0.1
    other_ids, other_mask = ids.copy(), mask.copy()
    other_ids[0, 5] = (ids[0, 5] + 7) % 256  # change one prompt token
    moved = reference_states(tiny["model"], other_ids, other_mask, (9, 18, 27))
    assert np.abs(moved[0, 6 : mask[0].sum()] - ref[0, 6 : mask[0].sum()]).max() > 1.0
    unmasked = reference_states(tiny["model"], ids, None, (9, 18, 27))
    pad_rows = ~mask.astype(bool)
    assert np.abs(unmasked[pad_rows] - ref[pad_rows]).max(axis=-1).min() > 0.1  # every pad row moves
    assert np.abs(unmasked[pad_rows] - ref[pad_rows]).max() > 1.0


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_layers_9_18_27_match_transformers_on_every_row(tiny, layout):
    encoder = load_text_encoder(tiny["root"] / layout, dtype="float32")
    assert (encoder.hidden_size, encoder.output_size, encoder.dtype) == (32, 96, np.float32)
    out = encoder(tiny["ids"], tiny["mask"])
    assert out.dtype == np.float32
    real = tiny["mask"].astype(bool)
    assert_close(np.asarray(out)[real], tiny["ref"][real], f"{layout}: real-token rows")
    assert_close(np.asarray(out)[~real], tiny["ref"][~real], f"{layout}: pad rows")


def test_embeddings_and_final_layer_follow_transformers_indexing(tiny):
    """hidden_states[0] is the embedding; the model's last entry is the final-normed state."""
    layers = (28, 0, 5)
    encoder = load_text_encoder(tiny["root"] / "single", layers=layers)
    out = encoder(tiny["ids"], tiny["mask"])
    assert_close(out, reference_states(tiny["model"], tiny["ids"], tiny["mask"], layers), "layers (28, 0, 5)")


def test_reads_only_embedding_and_layers_up_to_27(tiny, monkeypatch):
    read = set()
    original = LazyTensors.__getitem__
    monkeypatch.setattr(LazyTensors, "__getitem__", lambda self, name: read.add(name) or original(self, name))
    load_text_encoder(tiny["root"] / "sharded")
    layer_keys = {k for k in read if k.startswith("model.layers.")}
    assert {int(k.split(".")[2]) for k in layer_keys} == set(range(27))  # 0-based: layers 1..27
    assert len(layer_keys) == 27 * 11
    assert read - layer_keys == {"model.embed_tokens.weight"}


def test_loads_without_unneeded_tensors(tiny, tmp_path):
    """Layers 28+, model.norm and lm_head deleted from a copy: same output, bit for bit."""
    state = load_file(tiny["root"] / "single" / "model.safetensors")
    needed = {
        k: v
        for k, v in state.items()
        if k == "model.embed_tokens.weight" or (k.startswith("model.layers.") and int(k.split(".")[2]) < 27)
    }
    assert len(needed) < len(state) - 3
    save_file(needed, tmp_path / "model.safetensors")
    shutil.copy(tiny["root"] / "single" / "config.json", tmp_path / "config.json")
    pruned = load_text_encoder(tmp_path)(tiny["ids"], tiny["mask"])
    full = load_text_encoder(tiny["root"] / "single")(tiny["ids"], tiny["mask"])
    np.testing.assert_array_equal(np.asarray(pruned), np.asarray(full))


def test_bf16_checkpoint_loads_into_float32(tiny, tmp_path):
    """A bf16 checkpoint (as diffusers ships) upcast to float32 matches transformers on the rounded weights."""
    copy.deepcopy(tiny["model"]).to(torch.bfloat16).save_pretrained(tmp_path)
    # from_pretrained, not .float(): `.to(bf16)` would also round the RoPE frequency buffer.
    rounded = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref = reference_states(rounded, tiny["ids"], tiny["mask"], (9, 18, 27))
    out = load_text_encoder(tmp_path, dtype="float32")(tiny["ids"], tiny["mask"])
    assert_close(out, ref, "bf16 checkpoint, float32 compute")


def test_bfloat16_compute_is_as_close_as_transformers_bf16(tiny):
    """bf16 rounding differs between frameworks, so compare errors against the float32 truth instead."""
    ours = np.asarray(load_text_encoder(tiny["root"] / "single", dtype="bfloat16")(tiny["ids"], tiny["mask"]))
    reference = Qwen3ForCausalLM.from_pretrained(tiny["root"] / "single", dtype=torch.bfloat16).eval()  # as diffusers
    theirs = reference_states(reference, tiny["ids"], tiny["mask"], (9, 18, 27))
    ours_err, theirs_err = np.abs(ours - tiny["ref"]).mean(), np.abs(theirs - tiny["ref"]).mean()
    print(f"bf16 mean |Δ| vs float32: flowgen {ours_err:.3e}, transformers {theirs_err:.3e}")
    assert ours_err <= 1.5 * theirs_err


def test_rope_parameters_theta_and_linear_scaling(tmp_path):
    """transformers 5.x `rope_parameters` (type linear, non-default theta) on a shallow model."""
    rope = {"rope_type": "linear", "factor": 3.0, "rope_theta": 500.0}
    model = write_tiny_text_encoder(tmp_path, seed=1, num_hidden_layers=6, rope_parameters=rope)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "linear"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY_VOCAB, (2, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    out = load_text_encoder(tmp_path, layers=(2, 4, 6))(ids, mask)
    assert_close(out, reference_states(model, ids, mask, (2, 4, 6)), "linear rope, theta 500")


def test_config_reads_transformers_4_style_rope():
    base = dict(model_type="qwen3", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1)
    config = Qwen3EncoderConfig.from_hf({**base, "rope_theta": 5e6, "rope_scaling": None})
    assert (config.rope_theta, config.rope_linear_factor, config.head_dim) == (5e6, 1.0, 4)
    config = Qwen3EncoderConfig.from_hf({**base, "rope_theta": 5e6, "rope_scaling": {"type": "linear", "factor": 2}})
    assert (config.rope_theta, config.rope_linear_factor) == (5e6, 2.0)
    with pytest.raises(CheckpointError, match="rope type 'yarn'"):
        Qwen3EncoderConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4}})


def test_checkpoint_errors_name_the_file(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_text_encoder(tmp_path)
    config = json.loads((tiny["root"] / "single" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'llama'"):
        load_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layers"):
        load_text_encoder(tmp_path, layers=(9, 29))
    state = load_file(tiny["root"] / "single" / "model.safetensors")
    del state["model.layers.5.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: tensor 'model.layers.5.mlp.up_proj.weight' is missing"):
        load_text_encoder(tmp_path)
