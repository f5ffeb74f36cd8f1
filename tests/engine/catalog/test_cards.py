"""Model cards: resolution, weights lookup (HF cache, local paths, tiny model), identity, errors."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from flowgen.engine.catalog import cards, tiny_model
from flowgen.engine.weights import locate
from flowgen.errors import CheckpointError
from flowgen.limits import MAX_DEPTH, MAX_RECIPE_BYTES, MAX_VALUES

EXPECTED = {  # name: (AIR, architecture, kv, distilled, steps, CFG)
    "klein-9b-kv": ("runware:400@6", "klein-9b", True, True, 4, 1.0),
    "klein-9b": ("runware:400@2", "klein-9b", False, True, 4, 1.0),
    "klein-base-9b": ("runware:400@3", "klein-9b", False, False, 50, 4.0),
    "klein-4b": ("runware:400@4", "klein-4b", False, True, 4, 1.0),
    "klein-base-4b": ("runware:400@5", "klein-4b", False, False, 50, 4.0),
    "flux2-klein-tiny": (None, "tiny", True, True, 4, 1.0),
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_model.write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub and cards both use."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWGEN_CACHE", str(tmp_path / "flowgen"))
    return cache


def _fake_snapshot(cache: Path, repo: str, source: Path, commit: str = "a" * 40) -> Path:
    """The standard HF cache layout: blobs named by sha256, snapshot files as symlinks, refs/main."""
    import hashlib

    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    for file in source.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / file.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_builtin_cards():
    listed = cards.list_cards()
    assert {c.name for c in listed} == set(EXPECTED)
    assert listed[0].name == "klein-9b-kv" and listed[0].default and cards.default_card().air == "runware:400@6"
    for card in listed:
        air, arch, kv, distilled, steps, cfg = EXPECTED[card.name]
        assert (card.air, card.architecture, card.kv, card.distilled) == (air, arch, kv, distilled)
        assert (card.defaults.steps, card.defaults.cfg_scale, card.limits.cfg) == (steps, cfg, not distilled)
        if card.tiny is None:
            assert card.weights.hf_repo.startswith("black-forest-labs/FLUX.2-klein")
            assert card.transformer_config().hidden_size == (4096 if arch == "klein-9b" else 3072)
    assert cards.resolve_model("klein-9b-kv").weights.hf_repo == "black-forest-labs/FLUX.2-klein-9b-kv"
    assert cards.resolve_model("klein-9b-kv").weights.gated


@pytest.mark.parametrize("text, name", [("runware:400@6", "klein-9b-kv"), ("klein-9b-kv", "klein-9b-kv"),
                                        ("RUNWARE:400@5", "klein-base-4b"), ("flux2-klein-tiny", "flux2-klein-tiny"),
                                        ("black-forest-labs/flux.2-klein-4b", "klein-4b"), (None, "klein-9b-kv")])
def test_resolve(text, name):
    assert cards.resolve_model(text).name == name


def test_unknown_model_lists_known_ids():
    with pytest.raises(CheckpointError, match=r"unknown model 'klein-7b'; known models: klein-9b-kv \(runware:400@6\)"):
        cards.resolve_model("klein-7b")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        cards.resolve_model("/nowhere/model.safetensors")


def test_missing_real_weights_explain_how_to_download_and_never_use_tiny(hf_cache, tmp_path):
    with pytest.raises(CheckpointError) as err:
        cards.resolve_model("runware:400@6").weights_path()
    message = str(err.value)
    assert "\n" not in message
    assert "hf download black-forest-labs/FLUX.2-klein-9b-kv" in message and "HF_TOKEN" in message
    with pytest.raises(CheckpointError, match="hf download black-forest-labs/FLUX.2-klein-4B`") as err:
        cards.resolve_model("klein-4b").weights_path()
    assert "HF_TOKEN" not in str(err.value)  # not gated
    assert not (tmp_path / "flowgen").exists()  # the tiny model was not written as a fallback
    card = cards.resolve_model("runware:400@6")  # plans work without the weights
    assert card.identity()["source"] == "black-forest-labs/FLUX.2-klein-9b-kv" and "files" not in card.identity()
    assert card.weights_identity() is None


def test_weights_found_in_hf_cache(hf_cache, tiny_folder):
    snapshot = _fake_snapshot(hf_cache, "black-forest-labs/FLUX.2-klein-9b-kv", tiny_folder)
    card = cards.resolve_model("runware:400@6")
    assert card.weights_path() == snapshot
    weights = card.weights_identity()
    blob_hash = Path(os.path.realpath(snapshot / "transformer/diffusion_pytorch_model.safetensors")).name
    assert weights["files"]["transformer/diffusion_pytorch_model.safetensors"] == "sha256:" + blob_hash
    assert weights["revision"] == snapshot.name
    identity = card.identity()  # card facts only: the same as without the weights
    assert identity == {"name": "klein-9b-kv", "air": "runware:400@6", "architecture": "klein-9b", "kv": True,
                        "distilled": True, "source": "black-forest-labs/FLUX.2-klein-9b-kv"}


def test_weights_found_when_downloaded_with_other_case(hf_cache, tiny_folder):
    snapshot = _fake_snapshot(hf_cache, "black-forest-labs/FLUX.2-klein-9B-KV", tiny_folder)
    assert cards.resolve_model("klein-9b-kv").weights_path() == snapshot


def test_incomplete_snapshot_is_an_error(hf_cache, tiny_folder):
    snapshot = _fake_snapshot(hf_cache, "black-forest-labs/FLUX.2-klein-9b-kv", tiny_folder)
    shutil.rmtree(snapshot / "text_encoder")
    with pytest.raises(CheckpointError, match=r"is incomplete \(no weights in text_encoder\); download them"):
        cards.resolve_model("klein-9b-kv").weights_path()


def test_tiny_model_is_written_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGEN_CACHE", str(tmp_path))
    card = cards.resolve_model("flux2-klein-tiny")
    results, errors = [], []

    def first_use():
        try:
            results.append(card.weights_path())
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=first_use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    folder = results[0]
    assert folder.parent == tmp_path / "models" and folder.name.startswith("flux2-klein-tiny-")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [folder.name]  # no temp folders left behind
    assert cards.resolve_model(str(folder)).kv  # a complete pipeline folder
    assert card.identity()["tiny"] == tiny_model.identity(0) and card.weights_identity() is None


def test_card_from_local_folder(tiny_folder, tmp_path):
    card = cards.resolve_model(str(tiny_folder))
    assert card.weights_path() == tiny_folder and card.kv and card.distilled
    assert card.transformer_config() == tiny_model.TRANSFORMER
    assert set(card.weights_identity()["files"]) >= {"model_index.json", "transformer/diffusion_pytorch_model.safetensors"}
    assert card.weights_identity()["revision"] is None and card.identity()["source"] == str(tiny_folder)

    custom = tmp_path / "custom"
    shutil.copytree(tiny_folder, custom)
    index = json.loads((custom / "model_index.json").read_text())
    index.update(_class_name="Flux2KleinPipeline", is_distilled=False)  # a base model
    (custom / "model_index.json").write_text(json.dumps(index))
    plain = cards.resolve_model(str(custom))
    assert (plain.name, plain.kv, plain.distilled, plain.defaults.steps, plain.limits.cfg) == (
        "custom", False, False, 50, True)

    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        cards.resolve_model(str(tmp_path))
    index["_class_name"] = "FluxPipeline"
    (custom / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'FluxPipeline' is not a FLUX.2"):
        cards.resolve_model(str(custom))


def _bfl_file(path: Path, hidden: int, depth: int, single: int, prefix: str = "") -> Path:
    """A BFL-named file with the shapes that tell the architecture (other tensors stubbed)."""
    from safetensors.numpy import save_file

    tensors = {f"{prefix}img_in.weight": np.zeros((hidden, 128), np.float16)}
    tensors.update({f"{prefix}double_blocks.{i}.img_attn.qkv.weight": np.zeros(1, np.float16) for i in range(depth)})
    tensors.update({f"{prefix}single_blocks.{j}.linear1.weight": np.zeros(1, np.float16) for j in range(single)})
    save_file(tensors, str(path))
    return path


def test_card_from_bfl_single_file(tmp_path, hf_cache):
    named = _bfl_file(tmp_path / "flux-2-klein-9b-kv.safetensors", 4096, 8, 24)
    card = cards.resolve_model(str(named))
    assert card.name == "klein-9b-kv" and card.weights.transformer_file == named
    comfy = _bfl_file(tmp_path / "klein4.safetensors", 3072, 5, 20, prefix="model.diffusion_model.")
    with pytest.raises(CheckpointError, match="a klein-4b single file, but its variant"):
        cards.resolve_model(str(comfy))
    assert cards.resolve_model(str(comfy), variant="runware:400@5").name == "klein-base-4b"
    with pytest.raises(CheckpointError, match="holds a klein-4b transformer, but model 'klein-9b' is klein-9b"):
        cards.resolve_model(str(comfy), variant="klein-9b")
    odd = _bfl_file(tmp_path / "odd.safetensors", 64, 1, 2)
    with pytest.raises(CheckpointError, match="matches no FLUX.2 \\[klein\\] model"):
        cards.resolve_model(str(odd))
    # the text encoder and VAE still come from the card's repo
    with pytest.raises(CheckpointError, match="hf download black-forest-labs/FLUX.2-klein-9b-kv"):
        card.weights_path()


def test_large_file_identity_is_sampled_and_sees_data_changes(tmp_path):
    big = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [5 * 1024 * 1024], "data_offsets": [0, 20 * 1024 * 1024]}})
    header = header.encode() + b" " * (-len(header) % 8)
    with open(big, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 20 * 1024 * 1024)  # sparse: costs no disk
    first = locate.file_digest(big)
    assert first.startswith("sampled-sha256:")
    with open(big, "r+b") as f:
        f.seek(big.stat().st_size // 2)
        f.write(b"\x01")
    assert locate.file_digest(big) != first


def test_invalid_card_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\narchitecture: klein-9b\nkv: true\ndistilled: true\n"
                   "defaults: {steps: 4, CFGScale: 3.0, width: 1024, height: 1024}\n"
                   "weights: {hf_repo: a/b}\n")
    with pytest.raises(CheckpointError, match=r"bad.yaml: invalid model card: .*distilled model takes no CFG"):
        cards.load_card(bad)
    bad.write_text("name: x\narchitecture: klein-9b\nkv: true\ndistilled: true\nstepz: 3\n"
                   "defaults: {steps: 4, CFGScale: 1.0, width: 1000, height: 1024}\n")
    with pytest.raises(CheckpointError, match=r"bad.yaml: invalid model card: (defaults.width|stepz)"):
        cards.load_card(bad)


CARD = ("name: x\narchitecture: klein-9b\nkv: true\ndistilled: true\n"
        "defaults: {steps: 4, CFGScale: 1.0, width: 1024, height: 1024}\nweights: {hf_repo: a/b}\n")


def test_a_card_is_read_with_a_recipes_bounds(tmp_path):
    """Cards are read as recipes are (flowgen.safe_yaml, flowgen.limits): size, aliases, depth, tags,
    duplicate keys and what is not a file are one CheckpointError line naming the file."""
    card = tmp_path / "card.yaml"
    card.write_text(CARD)
    assert cards.load_card(card).name == "x"

    card.write_text(CARD + "# " + "x" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(CheckpointError) as err:
        cards.load_card(card)
    assert str(err.value) == f"{card}: is {card.stat().st_size:,} bytes, over the limit of 512 KiB for a model card"

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']  # "billion laughs": 9^9 values
    lines += [f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]" for prev, name in zip("abcdefgh", "bcdefghi")]
    card.write_text("\n".join(lines) + "\n" + CARD)
    with pytest.raises(CheckpointError) as err:
        cards.load_card(card)
    assert str(err.value).startswith(f"{card}:") and str(err.value).endswith(
        f"holds more than {MAX_VALUES:,} values with its aliases expanded; model cards are limited to {MAX_VALUES:,}")

    card.write_text(CARD + "extra: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n")
    with pytest.raises(CheckpointError, match=rf"card.yaml:7:\d+: nests deeper than {MAX_DEPTH} levels; "
                                              rf"model cards are limited to {MAX_DEPTH}$"):
        cards.load_card(card)
    card.write_text(CARD + "x: !!python/object:os.system {}\n")
    with pytest.raises(CheckpointError, match=r"card.yaml:7:4: YAML tag .* is not allowed: model cards are data only$"):
        cards.load_card(card)
    card.write_text(CARD + "name: y\n")
    with pytest.raises(CheckpointError, match=r"card.yaml:7:1: .*duplicate key 'name' \(first defined at line 1\)$"):
        cards.load_card(card)

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would wait for a writer, forever
    with pytest.raises(CheckpointError) as err:
        cards.load_card(fifo)
    assert str(err.value) == f"{fifo}: is not a regular file (a device, FIFO or socket); expected a file"


def test_cards_ship_in_the_package_data():
    """setup.py maps models/ to flowgen/models; every card file must match its package_data glob."""
    folder = cards.cards_dir()
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(f"{n}.yaml" for n in EXPECTED)
    setup_py = Path(__file__).resolve().parents[3] / "setup.py"
    if setup_py.is_file():  # running from the source tree
        text = setup_py.read_text()
        assert '"flowgen.models": "models"' in text and '"flowgen.models": ["*.yaml"]' in text


@pytest.mark.slow
def test_non_editable_wheel_contains_and_finds_the_cards(tmp_path):
    """Build a wheel from a copy of the project, install it with --target, list cards from there."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    root = Path(__file__).resolve().parents[3]
    src = tmp_path / "src"
    shutil.copytree(root / "flowgen", src / "flowgen", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "models", src / "models")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (root / name).exists():
            shutil.copy(root / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("flowgen-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert {f"flowgen/models/{n}.yaml" for n in EXPECTED} <= set(zf.namelist())
    subprocess.run(pip + ["install", str(wheel), "--no-deps", "--target", str(tmp_path / "site")], check=True)
    code = "import flowgen.engine.catalog.cards as c; print(c.cards_dir()); print(' '.join(x.name for x in c.list_cards()))"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                         cwd=tmp_path).stdout.split("\n")
    assert out[0] == str(tmp_path / "site" / "flowgen" / "models")
    assert set(out[1].split()) == set(EXPECTED)


def test_cards_are_typed_frozen_and_every_copy_is_validated():
    import pydantic

    card = cards.resolve_model("klein-base-4b")
    assert isinstance(card, cards.ModelCard) and isinstance(card.defaults, cards.Defaults)
    with pytest.raises(pydantic.ValidationError):
        card.distilled = True  # frozen
    with pytest.raises(pydantic.ValidationError, match="a distilled model takes no CFG"):
        card.replace(distilled=True)  # CFGScale 4.0 on a distilled card: rejected as in a YAML file
    assert card.replace(name="mine").defaults == card.defaults


def test_identity_never_depends_on_the_weights(hf_cache, tiny_folder):
    card = cards.resolve_model("klein-9b-kv")
    before = card.identity()
    _fake_snapshot(hf_cache, "black-forest-labs/FLUX.2-klein-9b-kv", tiny_folder)
    assert card.identity() == before and card.weights_identity() is not None
