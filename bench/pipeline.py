"""flowgen's Pipeline vs diffusers' Flux2KleinKVPipeline, end to end, on one mid-size random model.

The model (written once with diffusers/transformers `save_pretrained` to a temp folder):
transformer hidden 512 (4 heads × 128), 2 double + 4 single blocks; Qwen3 hidden 256 × 36 layers
(Klein reads hidden states 9/18/27, so flowgen never runs layers 28-36); a small 4-level VAE.
Both pipelines run float32 on the same CPU with the same prompts, references and latents.

Measured, per image (a batch of `--batch` distinct prompts, seconds / batch), after one warm-up call,
keeping per stage and in total the fastest of `--repeats` runs (the two sides interleaved call by call):
  * text-to-image, and a 4-reference edit (references of different sizes, shared by the batch);
  * stages, the same work on both sides:
      text        prompt encoding;
      references  reference preparation (resize/crop to pixels in [-1, 1]) + VAE encode;
      denoise     the sampling loop, INCLUDING the reference K/V computation: diffusers extracts the
                  K/V inside step 0 (all tokens through the blocks), flowgen runs a reference pre-pass
                  and then 4 cached steps (the pre-pass is timed apart and moved here from its
                  references stage); plus each side's small glue;
      decode      VAE decode + conversion to host pixels (diffusers' postprocess to numpy).
    flowgen's prompt/reference caches are cleared before every timed call, so both sides do the
    same work (cache hits would make flowgen's text/references ~0).
And the text encoder alone: Klein's layers (up to 27) vs running all 36 layers (`--text-alone`).

Usage: JAX_PLATFORMS=cpu .venv/bin/python bench/pipeline.py [--size 256] [--repeats 4] [--batch 2]
       [--cases t2i,edit] [--text-alone] [--no-append]   (appends to bench/RESULTS.md unless --no-append)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("text", "references", "denoise", "decode")
PROMPTS = ["a lighthouse on a cliff at dusk, oil painting", "a bowl of ramen, studio photo"]
REF_SIZES = [(256, 256), (320, 240), (240, 320), (288, 288)]  # (width, height)
SECTION = "## Pipeline (bench/pipeline.py)"


def write_model(root: Path) -> Path:
    """The mid-size random KV pipeline folder (diffusers layout)."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinKVPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from flowgen.engine.catalog.tiny_model import SCHEDULER_CONFIG
    from flowgen.engine.text.tiny_tokenizer import write_tiny_tokenizer
    from flowgen.engine.transformer.config import Flux2Config

    torch.manual_seed(0)
    cfg = Flux2Config(hidden_size=512, num_heads=4, depth=2, depth_single_blocks=4, context_in_dim=3 * 256)
    config = cfg.to_diffusers()
    config.pop("_class_name")
    transformer = Flux2Transformer2DModel(**config).eval()
    vae = AutoencoderKLFlux2(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16).eval()
    vocab = 384
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=36, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False)).eval()
    tokenizer = AutoTokenizer.from_pretrained(write_tiny_tokenizer(root / "_tokenizer", vocab_size=vocab))
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    folder = root / "model"
    Flux2KleinKVPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer).save_pretrained(folder)
    return folder


def pictures():
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for width, height in REF_SIZES:
        coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        out.append(Image.fromarray(np.repeat(np.repeat(coarse, 16, 0), 16, 1)[:height, :width].copy()))
    return out


def batch_prompts(batch: int) -> list[str]:
    """`batch` distinct prompts (the first two are PROMPTS), so neither side's text stage can share work."""
    return [PROMPTS[i % 2] + ("" if i < 2 else f", take {i // 2 + 1}") for i in range(batch)]


# ---------------------------------------------------------------------------------------------- flowgen


@contextlib.contextmanager
def timed_prepass(pipe):
    """Times flowgen's reference K/V pre-pass (waiting for its result), which its references stage
    includes; diffusers does that work inside its step 0."""
    import jax

    spent = [0.0]
    transformer = pipe.transformer
    original = transformer.reference_kv

    def call(*args, **kwargs):
        jax.block_until_ready((args, kwargs))  # the reference tokens' VAE encodes (dispatched async) stay out
        start = time.perf_counter()
        try:
            return jax.block_until_ready(original(*args, **kwargs))
        finally:
            spent[0] += time.perf_counter() - start

    transformer.reference_kv = call
    try:
        yield spent
    finally:
        transformer.__dict__.pop("reference_kv", None)


def run_flowgen(pipe, prompts, latents, refs, size):
    pipe.clear_caches()  # cold: the same work diffusers does
    with timed_prepass(pipe) as prepass:
        start = time.perf_counter()
        out = pipe.generate(prompts, references=None if refs is None else [refs] * len(prompts), width=size,
                            height=size, steps=4, latents=latents)
        total = time.perf_counter() - start
    times = dict(out.timings)
    times["references"] -= prepass[0]  # like for like: the K/V computation counts in denoise on both sides
    times["denoise"] += prepass[0]
    return total, times


# ---------------------------------------------------------------------------------------------- diffusers


class StageClock:
    """Times diffusers' stages by wrapping the methods that do them."""

    def __init__(self, pipe):
        self.pipe, self.times = pipe, dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def wrapped(self):
        pipe = self.pipe
        processor = pipe.image_processor
        pipe.encode_prompt = self._timed("text", pipe.encode_prompt)
        # references: resize/crop (preprocess) + VAE encode (prepare_image_latents), as flowgen's stage
        processor.preprocess = self._timed("references", processor.preprocess)
        pipe.prepare_image_latents = self._timed("references", pipe.prepare_image_latents)
        # decode: VAE decode + postprocess to numpy pixels, as flowgen's stage (decode + uint8 on the host)
        pipe.vae.decode = self._timed("decode", pipe.vae.decode)
        processor.postprocess = self._timed("decode", processor.postprocess)
        try:
            yield self.times
        finally:
            for name in ("encode_prompt", "prepare_image_latents"):
                pipe.__dict__.pop(name, None)
            for name in ("preprocess", "postprocess"):
                processor.__dict__.pop(name, None)
            pipe.vae.__dict__.pop("decode", None)

    def _timed(self, stage, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[stage] += time.perf_counter() - start

        return call


def run_diffusers(pipe, prompts, latents, refs, size):
    import torch

    clock = StageClock(pipe)
    with torch.no_grad(), clock.wrapped() as times:
        start = time.perf_counter()
        pipe(image=refs, prompt=prompts, height=size, width=size, num_inference_steps=4,
             latents=torch.from_numpy(latents), output_type="np")
        total = time.perf_counter() - start
    # the rest of the call: the denoising loop (incl. the K/V extraction in step 0) and small glue
    times["denoise"] = total - times["text"] - times["references"] - times["decode"]
    return total, times


# ---------------------------------------------------------------------------------------------- text encoder


def text_encoder_saving(folder: Path, repeats: int) -> tuple[float, float]:
    """Seconds per prompt (batch 1, 512 tokens) for Klein's layers vs all 36 layers."""
    from flowgen.engine.text.qwen3 import load_text_encoder
    from flowgen.engine.text.tokenizer import load_tokenizer

    tok = load_tokenizer(folder / "tokenizer", 512)
    ids, mask = tok([PROMPTS[0]])
    encoders = [load_text_encoder(folder / "text_encoder", "float32", layers=layers)
                for layers in ((9, 18, 27), (9, 18, 27, 36))]
    times: list[list[float]] = [[], []]
    for repeat in range(repeats + 1):  # interleaved; the first round compiles
        for enc, record in zip(encoders, times):
            start = time.perf_counter()
            enc(ids, mask).block_until_ready()
            if repeat:
                record.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


# ---------------------------------------------------------------------------------------------- main


def best(runs):
    """Per stage and in total, the fastest repeat (least disturbed by other jobs on a shared machine)."""
    return min(r[0] for r in runs), {stage: min(r[1][stage] for r in runs) for stage in STAGES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="distinct prompts per call (default 2)")
    parser.add_argument("--cases", default="t2i,edit", help="comma-separated: t2i, edit")
    parser.add_argument("--text-alone", action="store_true", help="also time the text encoder alone (27 vs 36 layers)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    if args.batch < 1 or not cases or set(cases) - {"t2i", "edit"}:
        parser.error("--batch must be >= 1 and --cases a comma-separated subset of t2i,edit")
    prompts = batch_prompts(args.batch)
    load_before = os.getloadavg()

    import jax
    import torch
    from diffusers import Flux2KleinKVPipeline

    from flowgen.engine.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp))
        ours = Pipeline.from_pretrained(folder)
        theirs = Flux2KleinKVPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        theirs.set_progress_bar_config(disable=True)
        n = args.size // 16
        latents = np.random.default_rng(1).standard_normal((len(prompts), 128, n, n)).astype(np.float32)
        refs = pictures()
        rows = []
        chosen = {"t2i": ("text-to-image", None), "edit": ("4-reference edit", refs)}
        for label, case_refs in (chosen[c] for c in cases):
            sides = {"flowgen": (run_flowgen, ours), "diffusers": (run_diffusers, theirs)}
            runs = {name: [] for name in sides}
            for repeat in range(args.repeats + 1):  # interleaved, so both sides see the same machine load
                for name, (run, pipe) in sides.items():
                    result = run(pipe, prompts, latents, case_refs, args.size)
                    if repeat:  # the first call is a warm-up (flowgen: compiles)
                        runs[name].append(result)
            results = {name: best(r) for name, r in runs.items()}
            for name, (total, _) in results.items():
                print(f"{label:18s} {name:9s} {total:.3f} s / batch", flush=True)
            rows.append((label, results))
        klein_full = text_encoder_saving(folder, 3 * args.repeats) if args.text_alone else None
    load_after = os.getloadavg()

    batch = len(prompts)
    lines = [
        "",
        SECTION,
        "",
        f"Mid-size random KV model (transformer 512 = 4×128, 2 double + 4 single blocks; Qwen3 256 × 36 layers; "
        f"VAE 32/64/64/64), float32, {args.size}×{args.size} output, 4 steps, batch {batch}, 512-token prompts; "
        f"the edit uses 4 references of {', '.join(f'{w}×{h}' for w, h in REF_SIZES)}. Seconds per image, fastest of "
        f"{args.repeats} repeats per stage and in total, after a warm-up; flowgen's prompt/reference caches "
        "cleared before each call. Stages are the same work on both sides: references = resize + VAE encode, "
        "the reference K/V (diffusers' step-0 extraction, flowgen's pre-pass) counted in denoise. "
        f"{platform.machine()}, {os.cpu_count()} CPU, jax {jax.__version__} ({jax.devices()[0].device_kind}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d %H:%M')}; load "
        f"average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end (shared machine: compare the "
        "ratios).",
        "",
        "| case | stage | flowgen s/img | diffusers s/img | diffusers / flowgen |",
        "|---|---|---|---|---|",
    ]
    for label, results in rows:
        ours_total, ours_stages = results["flowgen"]
        their_total, their_stages = results["diffusers"]
        for stage in STAGES:
            a, b = ours_stages[stage] / batch, their_stages[stage] / batch
            lines.append(f"| {label} | {stage} | {a:.4f} | {b:.4f} | {_ratio(b, a)} |")
        a, b = ours_total / batch, their_total / batch
        lines.append(f"| {label} | **total** | **{a:.4f}** | **{b:.4f}** | **{_ratio(b, a)}** |")
    if klein_full is not None:
        klein, full = klein_full
        lines += [
            "",
            f"Text encoder alone (flowgen, batch 1 × 512 tokens, fastest of {3 * args.repeats}): Klein's layers 1-27 "
            f"{klein * 1000:.1f} ms vs all 36 layers {full * 1000:.1f} ms — stopping at layer 27 saves "
            f"{100 * (1 - klein / full):.0f} % ({full / klein:.2f}× faster).",
        ]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)


def _ratio(theirs: float, ours: float) -> str:
    return f"{theirs / ours:.2f}×" if ours > 1e-6 else "—"


if __name__ == "__main__":
    main()
