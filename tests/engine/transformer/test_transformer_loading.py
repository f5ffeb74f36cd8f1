"""load_transformer: diffusers folders (single file, shards, pipeline root) and BFL single files.

The reference is a tiny diffusers Flux2Transformer2DModel with sharpened random weights. The BFL
dict used throughout is certified by diffusers' own BFL → diffusers converter (it must reproduce
the diffusers state dict exactly), so every load below is compared with a route that does not
depend on flowgen's key tables.
"""

from __future__ import annotations

import json
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from flowgen.engine import load_transformer
from flowgen.engine.transformer import positions as ids
from flowgen.engine.transformer.checkpoint import Checkpoint, infer_config
from flowgen.engine.transformer.compiled import CompiledTransformer
from flowgen.engine.transformer.config import NAMED_CONFIGS, Flux2Config
from flowgen.engine.transformer.keys import DiffusersAsBfl, bfl_to_diffusers, diffusers_shapes
from flowgen.engine.transformer.params import param_location
from flowgen.errors import CheckpointError

TINY = Flux2Config(
    hidden_size=32,
    num_heads=2,
    depth=1,
    depth_single_blocks=2,
    in_channels=12,
    context_in_dim=32,
    axes_dim=(4, 4, 4, 4),
    timestep_dim=32,
)


def _diffusers_kwargs(cfg: Flux2Config) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}


@pytest.fixture(scope="module")
def reference() -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**_diffusers_kwargs(TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:  # QK-norm scales start at 1: make a q/k mix-up visible
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            else:
                p.add_(0.2 * torch.randn_like(p))
        model.proj_out.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def state_dict(reference) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def bfl(state_dict) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in DiffusersAsBfl(state_dict).items()}


@pytest.fixture(scope="module")
def expected_params(bfl):
    return CompiledTransformer.from_bfl_tensors(TINY, bfl).params


@pytest.fixture(scope="module")
def folders(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    reference.save_pretrained(root / "single")
    reference.save_pretrained(root / "sharded", max_shard_size="100KB")
    reference.save_pretrained(root / "pipeline" / "transformer")
    (root / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    return root


def _torch(tensors: dict[str, np.ndarray], dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in tensors.items()}


def _write(path, tensors, dtype=torch.float32):
    save_file(_torch(tensors, dtype), str(path))
    return path


def _assert_same_params(actual, expected):
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    leaves_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_a == tree_e
    for (path, a), (_, e) in zip(leaves_a, leaves_e):
        assert a.dtype == e.dtype and a.shape == e.shape, jax.tree_util.keystr(path)
        assert np.array_equal(np.asarray(a), np.asarray(e)), jax.tree_util.keystr(path)


# --- key mapping ------------------------------------------------------------------------------


def test_bfl_dict_is_what_the_diffusers_converter_expects(state_dict, bfl):
    converted = convert_flux2_transformer_checkpoint_to_diffusers(_torch(bfl))
    assert sorted(converted) == sorted(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(converted[key], torch.from_numpy(value)), key
    # the BFL file really differs from diffusers where it should: fused qkv and swapped final halves
    h = TINY.hidden_size
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * h, h)
    assert not np.array_equal(bfl["final_layer.adaLN_modulation.1.weight"], state_dict["norm_out.linear.weight"])


def test_bfl_to_diffusers_is_the_inverse(state_dict, bfl):
    forward = bfl_to_diffusers(bfl)
    assert sorted(forward) == sorted(state_dict)
    for key, value in state_dict.items():
        assert np.array_equal(forward[key], value), key
    shapes = diffusers_shapes({k: v.shape for k, v in bfl.items()})
    assert shapes == {k: v.shape for k, v in state_dict.items()}


def test_diffusers_view_is_lazy_about_shapes(state_dict):
    view = DiffusersAsBfl(state_dict)
    assert view.shape("double_blocks.0.txt_attn.qkv.weight") == (3 * TINY.hidden_size, TINY.hidden_size)
    assert view.unmapped == []
    partial = dict(state_dict)
    del partial["transformer_blocks.0.attn.to_k.weight"]
    assert "double_blocks.0.img_attn.qkv.weight" not in DiffusersAsBfl(partial)


# --- loading each layout ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["single", "sharded", "pipeline", "single/diffusion_pytorch_model.safetensors"])
def test_diffusers_layouts_load_the_same_params(folders, where, expected_params):
    if where == "sharded":
        assert len(list((folders / "sharded").glob("*.safetensors"))) >= 2
        assert (folders / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    tr = load_transformer(folders / where)
    assert tr.config == TINY
    _assert_same_params(tr.params, expected_params)


def test_bfl_single_file_loads_the_same_params(tmp_path, bfl, expected_params):
    tr = load_transformer(_write(tmp_path / "flux-2-klein-tiny.safetensors", bfl))
    assert tr.config == TINY  # inferred from shapes
    _assert_same_params(tr.params, expected_params)


def test_each_stacked_leaf_is_one_host_buffer_the_cpu_device_adopts(bfl, expected_params, monkeypatch):
    """A stacked leaf is assembled layer by layer on the host and placed by one transfer (no program
    per layer); on the CPU backend the device array is that aligned buffer, not a copy of it, so the
    load's peak stays near one copy of the params."""
    from flowgen.engine.runtime import placement

    adopted, to_device = [], placement.to_device

    def spy(host, dtype=None, *, stacked=False):
        array = to_device(host, dtype, stacked=stacked)
        if stacked:
            adopted.append(host.ctypes.data == array.unsafe_buffer_pointer())
        return array

    monkeypatch.setattr(placement, "to_device", spy)
    loaded = CompiledTransformer.from_bfl_tensors(TINY, bfl)
    _assert_same_params(loaded.params, expected_params)
    stacked = {param_location(key)[0] for key in bfl if param_location(key)[1] is not None}
    assert len(adopted) == len(stacked) and all(adopted), adopted


def test_comfy_prefix_is_stripped_and_other_models_ignored(tmp_path, bfl, expected_params):
    tensors = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = np.ones((4, 4), np.float32)  # an all-in-one file's VAE
    tr = load_transformer(_write(tmp_path / "comfy.safetensors", tensors))
    _assert_same_params(tr.params, expected_params)


def test_bf16_file_gives_float32_params_of_the_rounded_weights(tmp_path, bfl, expected_params):
    tr = load_transformer(_write(tmp_path / "bf16.safetensors", bfl, torch.bfloat16), dtype="float32")
    rounded = {k: v.astype(ml_dtypes.bfloat16) for k, v in bfl.items()}
    _assert_same_params(tr.params, CompiledTransformer.from_bfl_tensors(TINY, rounded).params)
    leaves = jax.tree_util.tree_leaves(tr.params)
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves, jax.tree_util.tree_leaves(expected_params)))


def test_float32_file_to_bfloat16_params(folders, bfl):
    tr = load_transformer(folders / "single", dtype="bfloat16")
    _assert_same_params(tr.params, CompiledTransformer.from_bfl_tensors(TINY, bfl, dtype="bfloat16").params)
    leaves = jax.tree_util.tree_leaves_with_path(tr.params)
    kernels = [leaf for path, leaf in leaves if "kernel" in jax.tree_util.keystr(path)]
    assert kernels and all(k.dtype == ml_dtypes.bfloat16 for k in kernels)


@pytest.mark.parametrize("kind", ["flux2config", "dict", "path"])
def test_explicit_config_forms(folders, kind, expected_params):
    config = {
        "flux2config": TINY,
        "dict": TINY.to_diffusers(),
        "path": str(folders / "single" / "config.json"),
    }[kind]
    _assert_same_params(load_transformer(folders / "single", config=config).params, expected_params)


# --- forward parity -------------------------------------------------------------------------


def _max_error(ours, reference) -> tuple[float, float]:
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - reference)))
    return err, 1e-4 * max(1.0, float(np.max(np.abs(reference))))


def test_loaded_model_matches_diffusers_forward(reference, folders, tmp_path, bfl):
    rng = np.random.default_rng(1)
    h, w, txt_len = 3, 5, 7
    x = rng.standard_normal((2, h * w, TINY.in_channels)).astype(np.float32)
    txt = rng.standard_normal((2, txt_len, TINY.context_in_dim)).astype(np.float32)
    x_ids, txt_ids, t = ids.image_ids(h, w), ids.text_ids(txt_len), np.float32(0.6)
    with torch.no_grad():
        expected = reference(
            hidden_states=torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(txt),
            timestep=torch.full((2,), float(t)),
            img_ids=torch.from_numpy(x_ids),
            txt_ids=torch.from_numpy(txt_ids),
        ).sample.numpy().astype(np.float64)

    loaded = load_transformer(folders / "sharded")
    err, tol = _max_error(loaded(x, x_ids, t, txt, txt_ids), expected)
    print(f"diffusers folder vs diffusers forward: max|d| = {err:.2e} (tol {tol:.1e})")
    assert err <= tol

    # The check can fail: forgetting the final (shift, scale) swap, or fusing q/k/v in the wrong
    # order, moves the output far outside the tolerance.
    for mistake in ("final halves", "qkv order"):
        wrong = dict(bfl)
        if mistake == "final halves":
            wrong["final_layer.adaLN_modulation.1.weight"] = np.concatenate(
                np.split(bfl["final_layer.adaLN_modulation.1.weight"], 2)[::-1]
            )
        else:
            q, k, v = np.split(bfl["double_blocks.0.img_attn.qkv.weight"], 3)
            wrong["double_blocks.0.img_attn.qkv.weight"] = np.concatenate([k, q, v])
        mislabelled = CompiledTransformer.from_bfl_tensors(TINY, wrong)
        mislabelled.forward_fn = loaded.forward_fn  # same graph: reuse the compiled forward
        bad_err, _ = _max_error(mislabelled(x, x_ids, t, txt, txt_ids), expected)
        print(f"{mistake} mislabelled: max|d| = {bad_err:.2e}")
        assert bad_err > 100 * tol, mistake


# --- config inference -------------------------------------------------------------------------


class _ShapesOnly(dict):
    """A checkpoint stand-in that knows shapes but holds no data (to infer full-size configs)."""

    def shape(self, key):
        return self[key]


@pytest.mark.parametrize("name", ["klein-9b", "klein-4b"])
def test_infer_config_recovers_the_real_sizes(name):
    cfg = NAMED_CONFIGS[name]
    shapes = CompiledTransformer.expected_bfl_shapes(cfg)
    assert infer_config(Checkpoint("x.safetensors", _ShapesOnly(shapes), "bfl", None)) == cfg
    diffusers = _ShapesOnly(diffusers_shapes(shapes))
    assert infer_config(Checkpoint("x.safetensors", diffusers, "diffusers", None)) == cfg


def test_infer_config_with_other_head_dim_and_mlp_ratio():
    cfg = Flux2Config(hidden_size=48, num_heads=4, depth=2, depth_single_blocks=3, mlp_ratio=2.5, in_channels=8,
                      context_in_dim=24, axes_dim=(3, 3, 3, 3), timestep_dim=16)
    shapes = _ShapesOnly(CompiledTransformer.expected_bfl_shapes(cfg))
    assert infer_config(Checkpoint("x.safetensors", shapes, "bfl", None)) == cfg


# --- errors -----------------------------------------------------------------------------------


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_transformer(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_unexpected_and_misshaped_bfl_tensors(tmp_path, bfl):
    broken = dict(bfl)
    del broken["single_blocks.1.linear2.weight"]
    broken["double_blocks.0.img_attn.norm.query_norm.weight"] = np.ones(16, np.float32)
    broken["txt_in.weight"] = np.zeros((32, 31), np.float32)
    message = _error(_write(tmp_path / "broken.safetensors", broken), config=TINY)
    assert "broken.safetensors" in message
    assert "missing 1 tensor(s): single_blocks.1.linear2.weight" in message
    assert "unexpected tensor(s): double_blocks.0.img_attn.norm.query_norm.weight" in message
    assert "txt_in.weight (32, 31) (expected (32, 32))" in message


def test_missing_tensor_needed_for_inference(tmp_path, bfl):
    broken = {k: v for k, v in bfl.items() if k != "img_in.weight"}
    message = _error(_write(tmp_path / "noimg.safetensors", broken))
    assert "noimg.safetensors" in message and "img_in.weight" in message


def test_partial_qkv_in_diffusers_folder_names_the_diffusers_key(tmp_path, state_dict):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY.to_diffusers()))
    broken = {k: v for k, v in state_dict.items() if k != "transformer_blocks.0.attn.add_k_proj.weight"}
    broken["transformer_blocks.0.attn.to_v.weight"] = np.zeros((16, 32), np.float32)
    message = _error(_write(folder / "diffusion_pytorch_model.safetensors", broken))
    assert "diffusion_pytorch_model.safetensors" in message and "diffusers layout" in message
    assert "transformer_blocks.0.attn.add_k_proj.weight" in message
    assert "transformer_blocks.0.attn.to_v.weight (16, 32) (expected (32, 32))" in message


def test_wrong_named_config_lists_mismatches(folders):
    message = _error(folders / "single", config="klein-4b")
    assert "config 'klein-4b'" in message and "x_embedder.weight (32, 12) (expected (3072, 128))" in message
    assert "more)" in message  # long lists are cut short


def test_many_missing_keys_are_counted(tmp_path, bfl):
    only = {k: v for k, v in bfl.items() if not k.startswith("single_blocks.")}
    message = _error(_write(tmp_path / "nosingle.safetensors", only), config=TINY)
    assert "missing 8 tensor(s): single_blocks.0.linear1.weight" in message and "(+3 more)" in message


@pytest.mark.parametrize(
    "content",
    [b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(300), b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"],
    ids=["jpeg", "empty", "bad-header"],
)
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    message = _error(path)
    assert str(path) in message and "not a safetensors checkpoint" in message


def test_truncated_file(tmp_path, bfl):
    path = _write(tmp_path / "cut.safetensors", bfl)
    path.write_bytes(path.read_bytes()[:-100])
    message = _error(path)
    assert "cut.safetensors" in message and re.search(r"tensor '[\w.]+\.(weight|scale)' is truncated", message)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_diffusers()))
    assert "no transformer weights" in _error(tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"x")
    assert "diffusion_pytorch_model.bin: only .safetensors" in _error(tmp_path)
    assert "no such file" in _error(tmp_path / "nothing-here")


def test_flux2_dev_is_refused(tmp_path, folders, bfl):
    folder = tmp_path / "dev"
    shutil.copytree(folders / "single", folder)
    config = json.loads((folder / "config.json").read_text()) | {"guidance_embeds": True}
    (folder / "config.json").write_text(json.dumps(config))
    assert "guidance_embeds" in _error(folder)
    tensors = dict(bfl) | {"guidance_in.in_layer.weight": np.zeros((32, 32), np.float32)}
    message = _error(_write(tmp_path / "dev.safetensors", tensors))
    assert "dev.safetensors" in message and "FLUX.2 [dev]" in message and "guidance_in.in_layer.weight" in message


def test_other_models_are_refused(tmp_path):
    vae = {"encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)}
    message = _error(_write(tmp_path / "ae.safetensors", vae))
    assert "ae.safetensors" in message and "not a FLUX.2 transformer" in message
    flux1 = {"double_blocks.0.img_mod.lin.weight": np.zeros((4, 4), np.float32)}
    assert "FLUX.1" in _error(_write(tmp_path / "flux1.safetensors", flux1))


def test_unknown_config_name(folders):
    message = _error(folders / "single", config="klein-13b")
    assert "klein-13b" in message and "klein-9b" in message


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ("42", "int"), ('"klein"', "str"), ("null", "NoneType")])
def test_a_config_json_that_is_not_an_object_is_one_line_naming_the_file(tmp_path, text, kind):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError) as err:
        Flux2Config.from_diffusers(tmp_path)  # the folder: the message names the file in it
    assert str(err.value) == (
        f"{tmp_path / 'config.json'}: not a FLUX.2 transformer config (a JSON object is expected, this holds a {kind})"
    )
