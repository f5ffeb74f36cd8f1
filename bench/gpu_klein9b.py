"""FLUX.2 [klein] 9B transformer step time on one GPU: flowgen (JAX, bf16) vs diffusers (torch, bf16).

Random bf16 weights at the real 9B config. Workloads: 1024² text-to-image (4,096 image + 512 text
tokens) and a 4-reference 1024² edit (4 × 4,096 reference tokens): plain step (references
concatenated), KV (reference pre-pass + cached steps) and one pre-pass shared by 8 edits.
Prints seconds per step and achieved TFLOP/s (matmul + attention FLOPs).

`--throughput`: the whole sampling loop (flowgen's `Denoiser`, 4 steps, 1024² text-to-image) at
batch 1/2/4/8 — images per second, and the first call's compile apart — and, when more than one
device is present, data-parallel scaling: the loop on a mesh of every device (`data=N`, weights
replicated, each device on its rows) at N times the largest batch, against one device.

    .venv/bin/python bench/gpu_klein9b.py            # on a GPU machine
    .venv/bin/python bench/gpu_klein9b.py --throughput --skip-steps
    JAX_PLATFORMS=cpu .venv/bin/python bench/gpu_klein9b.py --tiny   # CPU smoke check
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
        .venv/bin/python bench/gpu_klein9b.py --tiny --throughput --skip-steps   # the mesh path on CPU
"""

from __future__ import annotations

import argparse
import gc
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # diffusers shares the GPU afterwards

import jax
import jax.numpy as jnp
import numpy as np
from flops import step_flops  # bench/flops.py (the script's folder is on sys.path)

from flowgen.engine.transformer import positions as ids
from flowgen.engine.transformer.compiled import CompiledTransformer
from flowgen.engine.transformer.config import Flux2Config

TINY = Flux2Config(hidden_size=256, num_heads=4, depth=2, depth_single_blocks=4, context_in_dim=384, axes_dim=(16, 16, 16, 16))
SHARED_EDITS = 8


def timed(fn, repeats: int) -> float:
    fn()  # compile / warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def report(name: str, seconds: float, flops: float | None):
    tflops = f"{flops / seconds / 1e12:8.3g}" if flops else "       -"
    print(f"{name:<52}{seconds:>10.4f}{tflops}")


def flowgen_rows(cfg, grid, n_txt, n_refs, repeats):
    tr = CompiledTransformer.random(cfg, dtype="bfloat16")
    key = jax.random.key(0)
    img = jax.random.normal(key, (1, grid * grid, 128), jnp.bfloat16)
    ref = jax.random.normal(key, (1, n_refs * grid * grid, 128), jnp.bfloat16)
    txt = jax.random.normal(key, (1, n_txt, cfg.context_in_dim), jnp.bfloat16)
    img_ids, txt_ids = ids.image_ids(grid, grid), ids.text_ids(n_txt)
    ref_ids = ids.reference_ids([(grid, grid)] * n_refs)
    n_img, n_ref = img.shape[1], ref.shape[1]
    all_ids = np.concatenate([img_ids, ref_ids])
    full = jnp.concatenate([img, ref], axis=1)

    t2i = timed(lambda: tr(img, img_ids, 0.5, txt, txt_ids).block_until_ready(), repeats)
    report(f"flowgen T2I step ({n_img + n_txt} tokens)", t2i, step_flops(cfg, n_img + n_txt, n_img + n_txt))
    plain = timed(lambda: tr(full, all_ids, 0.5, txt, txt_ids).block_until_ready(), repeats)
    n_all = n_img + n_ref + n_txt
    report(f"flowgen edit plain step ({n_refs} refs, {n_all} tokens)", plain, step_flops(cfg, n_all, n_all))
    prepass = timed(lambda: jax.block_until_ready(tr.reference_kv(ref, ref_ids)), repeats)
    report(f"flowgen edit reference pre-pass ({n_ref} tokens)", prepass, step_flops(cfg, n_ref, n_ref))
    kv = tr.reference_kv(ref, ref_ids)
    cached = timed(lambda: tr(img, img_ids, 0.5, txt, txt_ids, ref_kv=kv).block_until_ready(), repeats)
    report("flowgen edit cached step", cached, step_flops(cfg, n_img + n_txt, n_all))
    report("flowgen edit KV, per step of a 4-step edit", (prepass + 4 * cached) / 4, None)
    report(f"flowgen edit KV shared by {SHARED_EDITS}, per step", (prepass / SHARED_EDITS + 4 * cached) / 4, None)
    print(f"  KV speed-up (4 steps) plain/KV = {4 * plain / (prepass + 4 * cached):.2f}x; "
          f"shared = {4 * plain / (prepass / SHARED_EDITS + 4 * cached):.2f}x")
    # returning frees this model and its arrays (the caller then collects) before diffusers loads its own


def diffusers_rows(cfg, grid, n_txt, n_refs, repeats, device):
    import torch
    from diffusers import Flux2Transformer2DModel
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    dtype = torch.bfloat16
    config = cfg.to_diffusers()
    config.pop("_class_name")
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        model = Flux2Transformer2DModel(**config).eval()
        torch.set_default_dtype(previous)
    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    img, ref, txt = rand(1, grid * grid, 128), rand(1, n_refs * grid * grid, 128), rand(1, n_txt, cfg.context_in_dim)
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    img_ids, txt_ids = as_t(ids.image_ids(grid, grid)), as_t(ids.text_ids(n_txt))
    ref_ids = as_t(ids.reference_ids([(grid, grid)] * n_refs))
    t = torch.full((1,), 0.5, device=device, dtype=dtype)

    def call(x, x_ids, **kw):
        with torch.inference_mode():
            out = model(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_ids=x_ids, txt_ids=txt_ids, **kw)
        sync()
        return out

    n_img, n_ref = img.shape[1], ref.shape[1]
    n_all = n_img + n_ref + n_txt
    t2i = timed(lambda: call(img, img_ids), repeats)
    report(f"diffusers T2I step ({n_img + n_txt} tokens)", t2i, step_flops(cfg, n_img + n_txt, n_img + n_txt))
    plain = timed(lambda: call(torch.cat([img, ref], 1), torch.cat([img_ids, ref_ids])), repeats)
    report(f"diffusers edit plain step ({n_refs} refs)", plain, step_flops(cfg, n_all, n_all))
    extract_args = dict(kv_cache_mode="extract", num_ref_tokens=n_ref)
    extract = timed(lambda: call(torch.cat([ref, img], 1), torch.cat([ref_ids, img_ids]), **extract_args), repeats)
    report("diffusers edit KV extract step", extract, None)
    cache = call(torch.cat([ref, img], 1), torch.cat([ref_ids, img_ids]), **extract_args).kv_cache
    cached = timed(lambda: call(img, img_ids, kv_cache=cache, kv_cache_mode="cached"), repeats)
    report("diffusers edit KV cached step", cached, step_flops(cfg, n_img + n_txt, n_all))
    report("diffusers edit KV, per step of a 4-step edit", (extract + 3 * cached) / 4, None)


def throughput_rows(cfg, grid, n_txt, batches, steps, repeats):
    """Images per second of the whole loop per batch size; with several devices, data-parallel scaling."""
    from flowgen.engine.runtime.placement import Placement
    from flowgen.engine.sampling import names
    from flowgen.engine.sampling.loop import Conditioning, Denoiser, noise_keys

    tr = CompiledTransformer.random(cfg, dtype="bfloat16")
    choice = names.resolve(None)
    sigmas, sampler = choice.sigmas(steps, grid * grid), choice.sampler()
    rope_txt, rope_img = tr.rope(ids.text_ids(n_txt)), tr.rope(ids.image_ids(grid, grid))

    def loop_seconds(denoiser, params, batch) -> tuple[float, float]:
        key = jax.random.key(batch)
        x = jax.random.normal(key, (batch, grid * grid, 128), jnp.bfloat16)
        txt = jax.random.normal(key, (batch, n_txt, cfg.context_in_dim), jnp.bfloat16)
        cond, keys = Conditioning(txt, rope_txt, rope_img), noise_keys(list(range(batch)))

        def run():
            jax.block_until_ready(denoiser(params, x, cond, sigmas, sampler, keys, quantize_t=True))

        start = time.perf_counter()
        run()  # compile (from the persistent cache when warm) + one loop
        first = time.perf_counter() - start
        best = timed(run, repeats)
        return best, first - best

    one = Denoiser(tr.forward_fn, tr.stages)
    per_image = {}
    for batch in batches:
        seconds, compile_s = loop_seconds(one, tr.params, batch)
        per_image[batch] = seconds / batch
        print(f"{'loop batch ' + str(batch) + f', {steps} steps (1 device)':<52}{seconds:>10.4f}  "
              f"{batch / seconds:6.3f} img/s  compile {compile_s:.1f} s")
    devices = jax.local_device_count()
    if devices > 1:
        placement = Placement.build(devices, 1)
        params = placement.everywhere(tr.params)
        batch = max(batches) * devices
        seconds, compile_s = loop_seconds(Denoiser(tr.forward_fn, tr.stages, placement), params, batch)
        rate, alone = batch / seconds, 1 / per_image[max(batches)]
        print(f"{'loop batch ' + str(batch) + f' on data={devices}':<52}{seconds:>10.4f}  {rate:6.3f} img/s  "
              f"compile {compile_s:.1f} s  scaling {rate / alone:.2f}x of {devices} (vs batch {max(batches)} alone)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small config and sizes: a CPU smoke check")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--skip-steps", action="store_true", help="leave out the per-step rows (flowgen and diffusers)")
    parser.add_argument("--throughput", action="store_true", help="the loop at batch 1/2/4/8, and data-parallel scaling")
    parser.add_argument("--steps", type=int, default=4, help="--throughput: sampling steps per loop")
    args = parser.parse_args()
    if args.tiny:
        cfg, grid, n_txt = TINY, 8, 16
    else:
        cfg, grid, n_txt = Flux2Config.named("klein-9b"), 64, 512  # 1024² -> 64×64 tokens
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; config hidden={cfg.hidden_size} "
          f"layers={cfg.depth}+{cfg.depth_single_blocks}; grid {grid}x{grid}, {n_txt} text tokens")
    if not args.skip_steps:
        print(f"{'row':<52}{'s/step':>10}{'TFLOP/s':>8}")
        flowgen_rows(cfg, grid, n_txt, 4, args.repeats)
        gc.collect()
        jax.clear_caches()
    if args.throughput:
        print(f"{'row':<52}{'s/loop':>10}")
        throughput_rows(cfg, grid, n_txt, (1, 2, 4, 8), args.steps, max(1, args.repeats - 1))
        gc.collect()
        jax.clear_caches()
    if not args.skip_diffusers and not args.skip_steps:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        diffusers_rows(cfg, grid, n_txt, 4, args.repeats, device)


if __name__ == "__main__":
    main()
