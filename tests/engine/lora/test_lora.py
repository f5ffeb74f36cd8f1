"""LoRA / LoKr: flowgen's merged weights against diffusers' PEFT-injected adapters on the same weights.

Each format diffusers reads (diffusers/PEFT names, ai-toolkit/BFL names, PEFT's base_model.model.
prefix, kohya with alpha, LoKr; plus ai-toolkit with lora_down/up names) is written by hand as a
.safetensors file, loaded into diffusers' Flux2Transformer2DModel with `load_lora_adapter` and
into flowgen with `read_lora` + `merged_params`; velocities must agree as in the transformer parity
tests (max |Δ| ≤ 1e-4 · max(1, max |reference|)), after checking the LoRA moves the reference
a lot. LoKr is also checked against a plain numpy Kronecker formula; the end-to-end test runs
Flux2KleinKVPipeline.load_lora_weights against Pipeline.generate(loras=...) (PSNR ≥ 45 dB).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from flowgen.engine.lora.files import read_lora
from flowgen.engine.lora.merge import LoraWeights, merged_params
from flowgen.engine.transformer import positions as ids
from flowgen.engine.transformer.compiled import CompiledTransformer
from flowgen.engine.transformer.config import NAMED_CONFIGS
from flowgen.engine.transformer.params import param_location
from flowgen.errors import CheckpointError
from tests.engine.fixtures_pipeline import TRANSFORMER as CFG
from tests.engine.fixtures_pipeline import sharpen_transformer_
from tests.engine.fixtures_transformer import diffusers_to_bfl

torch.set_grad_enabled(False)
pytest.importorskip("peft")
H, M, RANK = CFG.hidden_size, CFG.mlp_hidden, 4
SENSITIVE = 0.05  # a LoRA must move the reference's velocity by at least this share of its size


@pytest.fixture(scope="module")
def models():
    """(diffusers transformer, flowgen CompiledTransformer) with the same sharpened weights."""
    from diffusers import Flux2Transformer2DModel

    config = dict(CFG.to_diffusers())
    config.pop("_class_name")
    reference = Flux2Transformer2DModel(**config).eval()
    sharpen_transformer_(reference)
    ours = CompiledTransformer.from_bfl_tensors(CFG, diffusers_to_bfl(reference.state_dict()))
    return reference, ours


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    h, w, t = 2, 3, 5
    return dict(x=rng.standard_normal((2, h * w, 128)).astype(np.float32), x_ids=ids.image_ids(h, w),
                txt=rng.standard_normal((2, t, CFG.context_in_dim)).astype(np.float32), txt_ids=ids.text_ids(t),
                t=np.asarray([0.8, 0.3], np.float32))


def velocity_reference(model, inputs) -> np.ndarray:
    return model(hidden_states=torch.from_numpy(inputs["x"]), encoder_hidden_states=torch.from_numpy(inputs["txt"]),
                 timestep=torch.from_numpy(inputs["t"]), img_ids=torch.from_numpy(inputs["x_ids"]),
                 txt_ids=torch.from_numpy(inputs["txt_ids"])).sample.numpy()


def velocity_ours(transformer, params, inputs) -> np.ndarray:
    merged = CompiledTransformer(transformer.config, transformer.graphdef, params, transformer.dtype)
    return np.asarray(merged(inputs["x"], inputs["x_ids"], inputs["t"], inputs["txt"], inputs["txt_ids"]))


def assert_close(ours, reference, what: str) -> None:
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - reference)))
    tol = 1e-4 * max(1.0, float(np.max(np.abs(reference))))
    print(f"{what}: max|Δ| = {err:.3e} (tol {tol:.1e})")
    assert err <= tol, f"{what}: max |Δ| {err:.3e} > {tol:.3e}"


def low_rank(rng, out_features: int, in_features: int, rank: int = RANK) -> tuple[np.ndarray, np.ndarray]:
    """(down (r, in), up (out, r)) whose product has the size of the base weights' rows."""
    down = rng.standard_normal((rank, in_features)).astype(np.float32) / np.sqrt(in_features)
    up = rng.standard_normal((out_features, rank)).astype(np.float32) * 0.8 / np.sqrt(rank)
    return down, up


# module name -> (out, in) in each naming; one LoRA per naming touches every kind of layer
DIFFUSERS_MODULES = {
    "transformer_blocks.0.attn.to_q": (H, H), "transformer_blocks.0.attn.to_k": (H, H),
    "transformer_blocks.1.attn.to_v": (H, H), "transformer_blocks.0.attn.add_k_proj": (H, H),
    "transformer_blocks.1.attn.to_out.0": (H, H), "transformer_blocks.0.attn.to_add_out": (H, H),
    "transformer_blocks.0.ff.linear_in": (2 * M, H), "transformer_blocks.1.ff_context.linear_out": (H, M),
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj": (3 * H + 2 * M, H),
    "single_transformer_blocks.1.attn.to_out": (H, H + M),
    "x_embedder": (H, 128), "context_embedder": (H, CFG.context_in_dim), "proj_out": (128, H),
    "norm_out.linear": (2 * H, H),  # diffusers' (scale, shift) order: flowgen swaps ΔW's halves
    "double_stream_modulation_img.linear": (6 * H, H),
}
BFL_MODULES = {
    "double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.1.txt_attn.qkv": (3 * H, H),
    "double_blocks.0.img_attn.proj": (H, H), "double_blocks.1.txt_mlp.0": (2 * M, H),
    "double_blocks.0.img_mlp.2": (H, M), "single_blocks.1.linear1": (3 * H + 2 * M, H),
    "single_blocks.0.linear2": (H, H + M), "img_in": (H, 128), "time_in.out_layer": (H, H),
    "single_stream_modulation.lin": (3 * H, H),
}
# diffusers' kohya converter knows no modulation layers (it drops them with a warning)
KOHYA_MODULES = {**{k: v for k, v in BFL_MODULES.items() if "modulation" not in k}, "final_layer.linear": (128, H)}


def lora_file(path, modules: dict, prefix: str, down_name="lora_A.weight", up_name="lora_B.weight", seed=0,
              alpha: float | None = None, sep="."):
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (out_features, in_features) in modules.items():
        name = prefix + (module.replace(".", "_") if sep == "_" else module)
        tensors[f"{name}.{down_name}"], tensors[f"{name}.{up_name}"] = low_rank(rng, out_features, in_features)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    save_file(tensors, str(path))
    return path


FORMATS = {
    "diffusers": lambda p: lora_file(p, DIFFUSERS_MODULES, "transformer."),
    "ai-toolkit": lambda p: lora_file(p, BFL_MODULES, "diffusion_model.", seed=1),
    # diffusers takes any `.lora_down.weight` file for kohya and drops these names (with a warning):
    # the reference reads the same tensors named lora_A / lora_B (READ_BY_DIFFUSERS_AS)
    "ai-toolkit-down-up": lambda p: lora_file(p, BFL_MODULES, "diffusion_model.", "lora_down.weight",
                                              "lora_up.weight", seed=2),
    "peft": lambda p: lora_file(p, BFL_MODULES, "base_model.model.", seed=3),
    "kohya": lambda p: lora_file(p, KOHYA_MODULES, "lora_unet_", "lora_down.weight", "lora_up.weight", seed=4,
                                 alpha=2.0, sep="_"),
}
READ_BY_DIFFUSERS_AS = {"ai-toolkit-down-up": lambda p: lora_file(p, BFL_MODULES, "diffusion_model.", seed=2)}


def lokr_file(path, seed=5, uniform=False):
    """LoKr on a fused qkv (w1 full, w2 decomposed, alpha) and on linear2 (w1 decomposed, w2 full; with
    `uniform`, as the qkv: PEFT builds one factor layout for every module and loads no mix)."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)  # noqa: E731
    tensors = {
        # near-square factors, as LyCORIS / PEFT factorise (PEFT re-derives them from the shapes)
        # qkv (192, 64) = kron(w1 (12, 8), w2 (16, 8)); w2 = w2_a (16, 2) @ w2_b (2, 8)
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": f(12, 8),
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_a": f(16, 2),
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_b": f(2, 8),
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": np.asarray(3.0, np.float32),
        # linear2 (64, 256) = kron(w1 (8, 16) = (8, 1) @ (1, 16), w2 (8, 16) full)
        "diffusion_model.single_blocks.0.linear2.lokr_w1_a": f(8, 1),
        "diffusion_model.single_blocks.0.linear2.lokr_w1_b": f(1, 16),
        "diffusion_model.single_blocks.0.linear2.lokr_w2": f(8, 16),
    }
    if uniform:
        for name in ("lokr_w1_a", "lokr_w1_b", "lokr_w2"):
            del tensors[f"diffusion_model.single_blocks.0.linear2.{name}"]
        tensors.update({"diffusion_model.single_blocks.0.linear2.lokr_w1": f(8, 16),
                        "diffusion_model.single_blocks.0.linear2.lokr_w2_a": f(8, 2),
                        "diffusion_model.single_blocks.0.linear2.lokr_w2_b": f(2, 16),
                        "diffusion_model.single_blocks.0.linear2.alpha": np.asarray(2.0, np.float32)})
    save_file(tensors, str(path))
    return path, tensors


@pytest.fixture
def with_adapters(models):
    """Load files into a fresh copy of the diffusers model: with_adapters([(path, weight), ...])."""

    def load(entries):
        from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin

        model = copy.deepcopy(models[0])
        names = []
        for index, (path, _) in enumerate(entries):
            state = Flux2LoraLoaderMixin.lora_state_dict(str(path))
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            model.load_lora_adapter(state, adapter_name=f"a{index}", prefix=None)
            names.append(f"a{index}")
        model.set_adapters(names, [weight for _, weight in entries])
        return model

    return load


def merged(models, entries):
    _, ours = models
    return merged_params(ours.params, CFG, [(read_lora(path, CFG), weight) for path, weight in entries])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_matches_diffusers(models, inputs, with_adapters, tmp_path, fmt):
    path = FORMATS[fmt](tmp_path / f"{fmt}.safetensors")
    theirs = READ_BY_DIFFUSERS_AS[fmt](tmp_path / "twin.safetensors") if fmt in READ_BY_DIFFUSERS_AS else path
    base = velocity_reference(models[0], inputs)
    reference = velocity_reference(with_adapters([(theirs, 1.0)]), inputs)
    moved = np.abs(reference - base).max()
    assert moved > SENSITIVE * np.abs(base).max(), f"{fmt}: the LoRA barely moves the reference"
    assert_close(velocity_ours(models[1], merged(models, [(path, 1.0)]), inputs), reference, fmt)


@pytest.mark.slow
def test_two_loras_with_weights_07_and_minus_05(models, inputs, with_adapters, tmp_path):
    first = FORMATS["diffusers"](tmp_path / "a.safetensors")
    second = FORMATS["kohya"](tmp_path / "b.safetensors")
    entries = [(first, 0.7), (second, -0.5)]
    reference = velocity_reference(with_adapters(entries), inputs)
    only_first = velocity_reference(with_adapters([(first, 0.7)]), inputs)
    assert np.abs(reference - only_first).max() > SENSITIVE * np.abs(only_first).max()
    assert_close(velocity_ours(models[1], merged(models, entries), inputs), reference, "0.7 a - 0.5 b")


def test_lokr_merges_the_kronecker_formula(models, tmp_path):
    path, t = lokr_file(tmp_path / "lokr.safetensors")
    weight = 0.6
    params = merged(models, [(path, weight)])
    prefix = "diffusion_model."
    # plain numpy: ΔW = kron(w1, w2) · alpha / rank, rank = the decomposed factor's inner size
    qkv = np.kron(t[prefix + "double_blocks.0.img_attn.qkv.lokr_w1"],
                  t[prefix + "double_blocks.0.img_attn.qkv.lokr_w2_a"] @ t[prefix + "double_blocks.0.img_attn.qkv.lokr_w2_b"])
    qkv *= 3.0 / 2
    linear2 = np.kron(t[prefix + "single_blocks.0.linear2.lokr_w1_a"] @ t[prefix + "single_blocks.0.linear2.lokr_w1_b"],
                      t[prefix + "single_blocks.0.linear2.lokr_w2"])  # no alpha: scale 1
    for key, delta in (("double_blocks.0.img_attn.qkv.weight", qkv), ("single_blocks.0.linear2.weight", linear2)):
        path_in_tree, layer = param_location(key)
        before, after = models[1].params, params
        for part in path_in_tree:
            before, after = before[part], after[part]
        change = np.asarray(after[...])[layer] - np.asarray(before[...])[layer]  # (in, out) kernels
        np.testing.assert_allclose(change, weight * delta.T, rtol=1e-5, atol=1e-6)
        assert np.abs(delta).max() > 0.1


def test_lokr_matches_diffusers(models, inputs, with_adapters, tmp_path):
    path, _ = lokr_file(tmp_path / "lokr.safetensors", uniform=True)
    reference = velocity_reference(with_adapters([(path, 0.6)]), inputs)
    assert np.abs(reference - velocity_reference(models[0], inputs)).max() > 0.01
    assert_close(velocity_ours(models[1], merged(models, [(path, 0.6)]), inputs), reference, "lokr")


def test_switching_sets_restores_the_base_exactly(models, tmp_path):
    path = FORMATS["ai-toolkit"](tmp_path / "a.safetensors")
    weights = LoraWeights(models[1])
    merged_once, key = weights.use([(path, 1.0)])
    base, base_key = weights.use([])
    assert base is models[1].params and base_key == () and key
    again, _ = weights.use([(str(path), 1.0)])
    a, b = merged_once["img_in"]["kernel"][...], again["img_in"]["kernel"][...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert weights.counters["lora_merge"] == 2
    assert weights.use([(path, 0.0)])[1] == ()  # weight 0: the base weights


def test_unknown_keys_are_refused_by_name(tmp_path):
    path = tmp_path / "odd.safetensors"
    down, up = low_rank(np.random.default_rng(0), H, H)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up,
               "transformer.transformer_blocks.0.attn.to_q.lora_A.bias": down[:, 0].copy(),
               "text_encoder.layers.0.q_proj.lora_A.weight": down}, str(path))
    with pytest.raises(CheckpointError) as err:
        read_lora(path, CFG)
    message = str(err.value)
    assert "\n" not in message and "2 tensor(s)" in message
    assert "to_q.lora_A.bias" in message and "text_encoder.layers.0.q_proj.lora_A.weight" in message


def test_a_lora_for_another_size_is_refused_naming_both_sizes(tmp_path):
    four_b = NAMED_CONFIGS["klein-4b"]
    path = lora_file(tmp_path / "4b.safetensors", {"double_blocks.0.img_attn.qkv": (3 * four_b.hidden_size,
                                                                                       four_b.hidden_size)},
                     "diffusion_model.")
    with pytest.raises(CheckpointError, match=r"this model \(FLUX.2 \[klein\] 9B .*made for FLUX.2 \[klein\] 4B"):
        read_lora(path, NAMED_CONFIGS["klein-9b"])
    with pytest.raises(CheckpointError, match=r"this model \(hidden 64, .*made for FLUX.2 \[klein\] 4B"):
        read_lora(path, CFG)
    assert read_lora(path, four_b).patches[0].target == "double_blocks.0.img_attn.qkv.weight"


@pytest.mark.slow
def test_kv_pipeline_with_a_lora_matches_diffusers_and_keys_the_reference_cache(tmp_path):
    """Flux2KleinKVPipeline.load_lora_weights vs Pipeline.generate(loras=...), with a reference image:
    the cached reference K/V must follow the weights (LoRA, then base, then LoRA again)."""
    from flowgen.engine.pipeline import Pipeline
    from tests.engine.fixtures_pipeline import MAX_SEQUENCE_LENGTH, psnr, reference_images, write_tiny_pipelines

    folders, theirs = write_tiny_pipelines(tmp_path / "pipes")
    pipe = theirs["kv"]
    path = FORMATS["ai-toolkit"](tmp_path / "lora.safetensors")
    height, width, prompts = 32, 48, ["a red fox in the snow", "blue"]
    noise = np.random.default_rng(0).standard_normal((1, 128, height // 16, width // 16)).astype(np.float32)
    latents, refs = np.repeat(noise, 2, axis=0), reference_images([(64, 80)])

    def reference():
        out = pipe(image=refs, prompt=prompts, height=height, width=width, num_inference_steps=4,
                   latents=torch.from_numpy(latents), output_type="np", max_sequence_length=MAX_SEQUENCE_LENGTH).images
        return list(np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8))

    plain = reference()
    pipe.load_lora_weights(str(path))
    with_lora = reference()
    pipe.unload_lora_weights()
    assert psnr(plain[0], with_lora[0]) < 30.0, "the LoRA barely changes the reference's images"

    ours = Pipeline.from_pretrained(folders["kv"], max_sequence_length=MAX_SEQUENCE_LENGTH)
    run = lambda loras: ours.generate(prompts, references=[refs] * 2, width=width, height=height, steps=4,  # noqa: E731
                                      latents=latents, loras=loras).images
    for loras, expected in (([(path, 1.0)], with_lora), (None, plain), ([(path, 1.0)], with_lora)):
        values = [psnr(a, b) for a, b in zip(run(loras), expected)]
        print(f"loras={loras}: PSNR {values}")
        assert min(values) >= 45.0
    assert ours.counters["reference_prepass"] == 2  # one per weights, the third call reused the first's
    assert ours.counters["lora_merge"] == 2

    # the workflow's adapter passes the batch's LoRAs and checks they are the files the plan hashed
    from flowgen.engine.lora.files import file_sha256
    from flowgen.run.engine import BatchRequest, PipelineEngine

    engine = PipelineEngine(folders["kv"])
    engine._pipe = ours
    request = BatchRequest(prompts=prompts, seeds=[1, 2], width=width, height=height, steps=4,
                           references=[refs] * 2, loras=[(str(path), 1.0)], lora_hashes=(file_sha256(path),))
    images = engine.generate_batch(request).images
    expected = ours.generate(prompts, references=[refs] * 2, width=width, height=height, steps=4, seeds=[1, 2],
                             loras=[(path, 1.0)]).images
    assert all(np.array_equal(a, b) for a, b in zip(images, expected))
    request.lora_hashes = ("0" * 64,)
    with pytest.raises(CheckpointError, match="changed since the plan"):
        engine.generate_batch(request)
