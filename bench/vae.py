"""flowgen's VAE vs diffusers' AutoencoderKLFlux2 on CPU: decode and encode, same weights, same inputs.

The model is bench/pipeline.py's VAE (block channels 32/64/64/64, 1 resnet per level, 16 groups,
random weights, seed 0), float32. Each side does the whole job the pipelines do around the VAE:
  decode: normalised latents (B, 128, S/16, S/16) -> inverse BatchNorm, unpatchify, decoder ->
          uint8 (B, S, S, 3) on the host;
  encode: images (B, S, S, 3) in [-1, 1] -> encoder, posterior mode, patchify, BatchNorm ->
          float32 (B, 128, S/16, S/16) on the host.

Every side runs in its own worker process (so one side's idle threads never bill the other), and
the calls alternate between the workers, round after round, so load from other jobs on a shared
machine hits all sides alike. Every worker keeps freed buffers for reuse (`host_memory`), as the
pipeline does and as bench/pipeline.py's shared process gives torch too. Per case and side: the fastest of `--repeats` rounds after a warm-up
(wall seconds), the least process CPU time of a call (all threads), and the page faults of that
call. `--cores 1` pins every worker to one core (torch 1 thread, XLA's pool sized to the one core):
CPU time then measures the work itself, the steadier figure on a busy machine.

    JAX_PLATFORMS=cpu .venv/bin/python bench/vae.py [--sizes 256 512] [--batch 1] [--repeats 8] [--cores 1]
    git worktree add /tmp/flowgen-before <commit>       # optional third side: an older flowgen
    JAX_PLATFORMS=cpu .venv/bin/python bench/vae.py --before /tmp/flowgen-before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
VAE_CONFIG = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16)  # as bench/pipeline.py
OPS = ("decode", "encode")


def write_vae(root: Path) -> Path:
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    folder = root / "vae"
    AutoencoderKLFlux2(**VAE_CONFIG).eval().save_pretrained(folder)
    return folder


def inputs(op: str, size: int, batch: int):
    import numpy as np

    rng = np.random.default_rng(size * 10 + batch)
    if op == "decode":
        return rng.standard_normal((batch, 128, size // 16, size // 16)).astype(np.float32)
    return np.tanh(rng.standard_normal((batch, size, size, 3))).astype(np.float32)


# ---------------------------------------------------------------------------------------------- sides


def flowgen_side(folder: Path):
    import jax.numpy as jnp
    import numpy as np

    try:
        from flowgen.engine.vae.model import load_vae
    except ImportError:  # a tree from before the VAE had its own folder (--before)
        from flowgen.engine.vae import load_vae  # type: ignore[no-redef]

    vae = load_vae(folder)
    return {
        "decode": lambda z: np.asarray(vae.decode(jnp.asarray(z))),
        "encode": lambda x: np.asarray(vae.encode(jnp.asarray(x))),
    }


def diffusers_side(folder: Path):
    import torch
    from diffusers import AutoencoderKLFlux2
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as Klein

    vae = AutoencoderKLFlux2.from_pretrained(folder, torch_dtype=torch.float32).eval()
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)

    @torch.no_grad()
    def decode(z):  # Flux2KleinPipeline's decode path and its image processor's uint8 conversion
        x = vae.decode(Klein._unpatchify_latents(torch.from_numpy(z) * std + mean), return_dict=False)[0]
        x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        return (x * 255).round().to(torch.uint8).numpy()

    @torch.no_grad()
    def encode(images):  # Flux2KleinPipeline._encode_vae_image
        z = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mode()
        return ((Klein._patchify_latents(z) - mean) / std).numpy()

    return {"decode": decode, "encode": encode}


def worker(side: str, folder: Path, cores: int) -> None:
    """One side's process: reads `op size batch` lines, runs that call, prints its timings as JSON."""
    if cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    from flowgen.engine import host_memory

    host_memory.keep_freed_buffers()  # as the pipeline does once its transformer is loaded; torch too, as
    # bench/pipeline.py's shared process gives it (glibc's default re-faults torch's large buffers each call)
    if side == "diffusers":
        import torch

        if cores:
            torch.set_num_threads(cores)
        calls = diffusers_side(folder)
    else:
        calls = flowgen_side(folder)
    cache = {}
    for line in sys.stdin:
        op, size, batch = line.split()
        key = (op, int(size), int(batch))
        data = cache.setdefault(key, inputs(*key))
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        calls[op](data)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        print(
            json.dumps(
                {
                    "wall": wall,
                    "cpu": cpu,
                    "sys": after.ru_stime - before.ru_stime,
                    "faults": after.ru_minflt - before.ru_minflt,
                }
            ),
            flush=True,
        )


class Worker:
    def __init__(self, side: str, tree: Path, folder: Path, cores: int):
        code = (
            "import sys; sys.path[:0] = sys.argv[1:3]; import vae as bench;"
            "from pathlib import Path; bench.worker(sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]))"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(tree), str(Path(__file__).parent), side, str(folder), str(cores)],
            cwd=tree,
            env=dict(os.environ, PYTHONPATH=str(tree)),
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def call(self, op: str, size: int, batch: int) -> dict:
        self.proc.stdin.write(f"{op} {size} {batch}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        while not line.startswith("{"):  # skip anything a library printed
            if not line:
                raise RuntimeError(f"the {self.proc.args[5]} worker died")
            line = self.proc.stdout.readline()
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--cores", type=int, default=0, help="pin each worker to this many cores (0: all)")
    parser.add_argument("--before", type=Path, help="source tree of an older flowgen, timed as a third side")
    args = parser.parse_args()
    if any(size % 16 for size in args.sizes):
        sys.exit("bench/vae.py: --sizes must be multiples of 16")

    sides = {"diffusers": REPO, "flowgen": REPO}
    if args.before:
        sides = {"diffusers": REPO, "before": args.before.resolve(), "flowgen": REPO}
    cases = [(op, size, args.batch) for size in args.sizes for op in OPS]
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(REPO))
        folder = write_vae(Path(tmp))
        workers = {name: Worker(name, tree, folder, args.cores) for name, tree in sides.items()}
        runs = {(name, case): [] for name in sides for case in cases}
        for repeat in range(args.repeats + 1):
            for case in cases:
                for name, w in workers.items():  # interleaved: the same load hits every side
                    result = w.call(*case)
                    if repeat:  # the first round is a warm-up (flowgen: compiles)
                        runs[name, case].append(result)
        for w in workers.values():
            w.close()

    import jax
    import torch

    threads = f"{args.cores} core(s) per worker" if args.cores else f"all {os.cpu_count()} cores"
    lines = [
        f"VAE 32/64/64/64 (bench/pipeline.py's), float32, batch {args.batch}; {threads}; fastest of "
        f"{args.repeats} interleaved rounds after a warm-up. {platform.machine()}, {os.cpu_count()} CPU, "
        f"jax {jax.__version__}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"load average {os.getloadavg()[0]:.1f}.",
        "",
        "| op | size | side | wall ms | CPU ms | page faults | wall / diffusers | CPU / diffusers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op, size, batch in cases:
        base = runs["diffusers", (op, size, batch)]
        base_wall, base_cpu = min(r["wall"] for r in base), min(r["cpu"] for r in base)
        for name in sides:
            rs = runs[name, (op, size, batch)]
            wall, cpu = min(r["wall"] for r in rs), min(rs, key=lambda r: r["cpu"])
            lines.append(
                f"| {op} | {size}² | {name} | {wall * 1000:.1f} | {cpu['cpu'] * 1000:.1f} | {cpu['faults']} | "
                f"{wall / base_wall:.2f} | {cpu['cpu'] / base_cpu:.2f} |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
