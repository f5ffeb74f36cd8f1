"""The model identity a plan hashes is the card's, never the weights': the same plan before and after
a download. The weight files' digests are recorded apart (ModelCard.weights_identity, in the engine
identity each manifest record keeps under "engine")."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from flowgen.engine.catalog import cards
from flowgen.plan.from_recipe import plan_recipe
from flowgen.plan.hashing import model_key

REPO = "black-forest-labs/FLUX.2-klein-9b-kv"  # klein-9b-kv's weights
# The tiny card's identity as hashed, recorded before the weights' digests moved out of the identity
# (they never were in the tiny card's): its plans keep their content hashes.
TINY_MODEL_KEY_SHA256 = "22176e5a2528403e4622f9be455313062380c2077106cfcbe36a0322f3ee36fa"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline, that huggingface_hub and the cards both read."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWGEN_CACHE", str(tmp_path / "flowgen"))
    return cache


def fake_snapshot(cache: Path, repo: str, commit: str = "c" * 40) -> Path:
    """A complete-looking diffusers pipeline in the HF cache layout (blobs, snapshot symlinks,
    refs/main); its "weights" are a few bytes each."""
    files = {
        "model_index.json": json.dumps({"_class_name": "Flux2KleinKVPipeline", "is_distilled": True,
                                        "transformer": ["diffusers", "Flux2Transformer2DModel"],
                                        "vae": ["diffusers", "AutoencoderKLFlux2"],
                                        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
                                        "tokenizer": ["transformers", "Qwen2TokenizerFast"],
                                        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}),
        "transformer/config.json": "{}",
        "transformer/diffusion_pytorch_model.safetensors": "transformer weights",
        "vae/config.json": "{}",
        "vae/diffusion_pytorch_model.safetensors": "vae weights",
        "text_encoder/config.json": "{}",
        "text_encoder/model.safetensors": "text encoder weights",
        "tokenizer/tokenizer.json": "{}",
        "scheduler/scheduler_config.json": "{}",
    }
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    for name, text in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(text.encode()).hexdigest()
        blob.write_text(text)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def write_recipe(folder: Path, model: str) -> Path:
    recipe = {"version": 1, "name": "identity", "model": model, "seed": 3,
              "datasets": {"things": {"values": ["a cup", "a lamp"]}}, "matrix": {"thing": "things"},
              "task": {"positivePrompt": "a photo of {thing}", "width": 512, "height": 512, "numberResults": 2}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def hashes(plan) -> list[tuple[str, int, str]]:
    return [(r.item.item_id, r.result_index, r.content_hash) for r in plan.results]


def test_a_plan_made_before_the_download_matches_the_one_after(tmp_path, hf_cache):
    recipe = write_recipe(tmp_path, "klein-9b-kv")
    card = cards.resolve_model("klein-9b-kv")
    assert card.weights_identity() is None  # weights absent
    before = plan_recipe(recipe, tmp_path / "out")

    snapshot = fake_snapshot(hf_cache, REPO)
    assert card.weights_path() == snapshot  # weights "downloaded"
    weights = card.weights_identity()
    assert weights["revision"] == snapshot.name and "transformer/diffusion_pytorch_model.safetensors" in weights["files"]
    after = plan_recipe(recipe, tmp_path / "out")

    assert after.model_identity == before.model_identity == card.identity()
    assert "files" not in after.model_identity
    assert hashes(after) == hashes(before) and len(hashes(after)) == 4
    assert after.plan_hash == before.plan_hash


def test_the_weights_digests_are_recorded_by_the_engine_source_not_hashed(tmp_path, hf_cache):
    from flowgen.engine.source import resolve_source  # JAX-free: no weights are loaded

    fake_snapshot(hf_cache, REPO)
    source = resolve_source("runware:400@6")
    assert source.identity == cards.resolve_model("klein-9b-kv").identity()
    assert source.weights == cards.resolve_model("klein-9b-kv").weights_identity() is not None


def test_the_tiny_cards_hashed_identity_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGEN_CACHE", str(tmp_path / "flowgen"))
    card = cards.resolve_model("flux2-klein-tiny")
    assert hashlib.sha256(model_key(card.identity()).encode()).hexdigest() == TINY_MODEL_KEY_SHA256
    before = plan_recipe(write_recipe(tmp_path, "flux2-klein-tiny"), tmp_path / "out")
    card.weights_path()  # writes the tiny model to the flowgen cache
    after = plan_recipe(write_recipe(tmp_path, "flux2-klein-tiny"), tmp_path / "out")
    assert hashes(after) == hashes(before)
