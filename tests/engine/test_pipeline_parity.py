"""End-to-end parity of flowgen's Pipeline with diffusers' Klein pipelines on the same tiny weights.

One tiny pipeline (fixtures_pipeline) saved as Flux2KleinKVPipeline, Flux2KleinPipeline (distilled)
and Flux2KleinPipeline (base, CFG). Both sides get the same initial latents and prompts; images are
compared as uint8 at the pipelines' outputs. Every comparison first checks that the reference
itself reacts strongly (< 30 dB) to what the case is about (prompts, references), so a port that
ignored them could not pass.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from flowgen.engine.pipeline import Pipeline
from flowgen.engine.source import resolve_source
from tests.engine.fixtures_pipeline import (
    MAX_SEQUENCE_LENGTH,
    psnr,
    reference_images,
    write_tiny_pipelines,
)

torch.set_grad_enabled(False)
PSNR_F32 = 45.0  # every item
BF16_ERROR_RATIO = 1.5  # flowgen bf16's distance to float64, relative to diffusers bf16's
SENSITIVE = 30.0  # the reference must move below this when the tested input changes
H, W = 32, 48  # output, non-square
PROMPTS = ["a red fox in the snow", "blue"]
REF_SIZES = [(64, 80), (96, 64), (80, 112)]  # (width, height), all different
STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """({kind: folder}, {kind: diffusers pipeline}) — the folders were written by those pipelines."""
    return write_tiny_pipelines(tmp_path_factory.mktemp("tiny_pipelines"))


@pytest.fixture(scope="module")
def folders(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def theirs(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def ours(folders):
    """flowgen pipelines per kind; the plain ones share the KV one's loaded components (and compiled code)."""
    kv = Pipeline.from_pretrained(folders["kv"], max_sequence_length=MAX_SEQUENCE_LENGTH)
    pipes = {"kv": kv}
    for kind in ("distilled", "base"):
        pipes[kind] = Pipeline(kv.transformer, kv.vae, kv.prompts.tokenizer, kv.prompts.encoder,
                               resolve_source(folders[kind]), max_sequence_length=MAX_SEQUENCE_LENGTH)
    return pipes


@pytest.fixture(scope="module")
def latents():
    """The same noise for both items: what differs between them is the prompt only."""
    noise = np.random.default_rng(0).standard_normal((1, 128, H // 16, W // 16)).astype(np.float32)
    return np.repeat(noise, len(PROMPTS), axis=0)


@pytest.fixture(scope="module")
def refs():
    return reference_images(REF_SIZES)


def run_reference(pipe, latents, images=None, **kwargs) -> list[np.ndarray]:
    out = pipe(image=images, prompt=PROMPTS, height=H, width=W, num_inference_steps=STEPS,
               latents=torch.from_numpy(latents), output_type="np", max_sequence_length=MAX_SEQUENCE_LENGTH,
               **kwargs).images
    return list(np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8))


def run_ours(pipe, latents, images=None, **kwargs) -> list[np.ndarray]:
    references = None if images is None else [images] * len(PROMPTS)
    return pipe.generate(PROMPTS, references=references, width=W, height=H, steps=STEPS, latents=latents,
                         **kwargs).images


def compare(ours, theirs, floor: float, label: str) -> list[float]:
    values = [psnr(a, b) for a, b in zip(ours, theirs)]
    print(f"{label}: PSNR {', '.join(f'{v:.1f}' for v in values)} dB")
    assert all(a.shape == b.shape == (H, W, 3) and a.dtype == np.uint8 for a, b in zip(ours, theirs))
    assert min(values) >= floor, f"{label}: PSNR {values} below {floor} dB"
    return values


@pytest.fixture(scope="module")
def kv_reference(theirs, latents, refs):
    """diffusers KV outputs for T2I, 1 reference and 3 references (used by several tests)."""
    pipe = theirs["kv"]
    return {n: run_reference(pipe, latents, None if n == 0 else refs[:n]) for n in (0, 1, 3)}


def test_sources_read_from_model_index(ours):
    assert (ours["kv"].is_kv, ours["kv"].distilled) == (True, True)
    assert (ours["distilled"].is_kv, ours["distilled"].distilled) == (False, True)
    assert (ours["base"].is_kv, ours["base"].distilled) == (False, False)


@pytest.mark.slow
def test_reference_fixture_is_sensitive(kv_reference):
    t2i, one, three = kv_reference[0], kv_reference[1], kv_reference[3]
    assert psnr(t2i[0], t2i[1]) < SENSITIVE, "prompts barely change the reference's images"
    assert psnr(t2i[0], one[0]) < SENSITIVE, "a reference barely changes the reference's images"
    assert psnr(one[0], three[0]) < SENSITIVE, "more references barely change the reference's images"


@pytest.mark.slow
@pytest.mark.parametrize("num_refs", [0, 1, 3])
def test_kv_pipeline_matches_diffusers(ours, kv_reference, latents, refs, num_refs):
    images = None if num_refs == 0 else refs[:num_refs]
    compare(run_ours(ours["kv"], latents, images), kv_reference[num_refs], PSNR_F32, f"kv {num_refs} refs")


@pytest.mark.slow
def test_distilled_pipeline_with_references_matches_diffusers(ours, theirs, latents, refs, kv_reference):
    reference = run_reference(theirs["distilled"], latents, refs[:2])
    assert psnr(reference[0], kv_reference[0][0]) < SENSITIVE
    compare(run_ours(ours["distilled"], latents, refs[:2]), reference, PSNR_F32, "distilled 2 refs")


def test_base_pipeline_cfg_matches_diffusers(ours, theirs, latents, refs):
    pipe = theirs["base"]
    reference = run_reference(pipe, latents, refs[:1], guidance_scale=4.0)
    no_cfg = run_reference(pipe, latents, refs[:1], guidance_scale=1.0)
    assert psnr(reference[0], no_cfg[0]) < SENSITIVE, "CFG barely changes the reference's images"
    compare(run_ours(ours["base"], latents, refs[:1], guidance=4.0), reference, PSNR_F32, "base CFG 4.0, 1 ref")


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


@pytest.mark.slow
def test_bfloat16_pipeline_error_is_diffusers_own(folders, theirs, latents, refs):
    """flowgen in bf16 is about as far from an exact (float64) diffusers run as diffusers' own bf16 run.

    Not a PSNR floor against float32: with every timestep feature live, a bf16 pipeline rounds 1000·t
    to a bf16 step (4 apart near 1000), which turns the fastest sinusoids (1 rad per unit) by
    radians, so any bf16 run, diffusers' included, lands ~25 dB from the float32 images."""
    pipe = Pipeline.from_pretrained(folders["kv"], dtype="bfloat16", max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert pipe.dtype == np.dtype("bfloat16") and pipe.transformer.dtype == np.dtype("bfloat16")
    exact = run_reference(copy.deepcopy(theirs["kv"]).to(torch.float64), latents, refs[:1])
    reference = run_reference(copy.deepcopy(theirs["kv"]).to(torch.bfloat16), latents, refs[:1])
    ours = run_ours(pipe, latents, refs[:1])
    for i, (o, r, e) in enumerate(zip(ours, reference, exact)):
        print(f"kv bf16, 1 ref, item {i}: RMS vs float64 flowgen {rms(o, e):.2f} diffusers {rms(r, e):.2f} "
              f"({rms(o, e) / rms(r, e):.2f}x); PSNR vs float64 {psnr(o, e):.1f} / {psnr(r, e):.1f} dB, "
              f"flowgen vs diffusers bf16 {psnr(o, r):.1f} dB")
        assert rms(o, e) <= BF16_ERROR_RATIO * rms(r, e), f"item {i}"


def test_identity_names_the_model(ours, folders):
    identity = ours["kv"].identity()
    assert identity["kv"] is True and identity["dtype"] == "float32"
    assert identity["jax"] and identity["flowgen"] and identity["device_kind"]
    assert dataclasses.asdict(resolve_source(folders["kv"]))["identity"] == identity["card"]
