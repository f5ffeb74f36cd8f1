"""Peak host memory of `load_transformer`, as a multiple of the checkpoint size.

Writes a ~1 GB float32 checkpoint of a mid-size FLUX.2 config (random weights, streamed to disk so
the writer stays small) in a temp dir, in the BFL single-file layout and as a sharded diffusers
folder, then loads each in a fresh subprocess and reports

    ratio = (peak RSS during the load − RSS just before it) / checkpoint bytes

A streaming loader sits near 1.0 (the params themselves, float32 → float32); materialising the
whole state dict first would show ≥ 2.0. Usage:

    .venv/bin/python bench/load_memory.py [--size-gb 1.0] [--layout bfl|diffusers|both]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_config(size_gb: float):
    """H=1024 (8 heads of 128), 2 double blocks, and as many single blocks as reach `size_gb` in fp32."""
    from flowgen.engine.transformer.config import Flux2Config
    from flowgen.engine.transformer.params import expected_bfl_shapes

    def nbytes(cfg):
        return 4 * sum(int(np.prod(s)) for s in expected_bfl_shapes(cfg).values())

    cfg = Flux2Config(hidden_size=1024, num_heads=8, depth=2, depth_single_blocks=1, context_in_dim=3072)
    while nbytes(cfg) < size_gb * 1e9:
        cfg = Flux2Config(**{**cfg.__dict__, "depth_single_blocks": cfg.depth_single_blocks + 1})
    return cfg


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> int:
    """Stream random float32 tensors into a safetensors file, one tensor in memory at a time."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            f.write((0.02 * rng.standard_normal(shape, dtype=np.float32)).tobytes())
    return path.stat().st_size


def write_checkpoints(cfg, root: Path) -> dict[str, tuple[Path, int]]:
    from flowgen.engine.transformer.keys import diffusers_shapes
    from flowgen.engine.transformer.params import expected_bfl_shapes

    rng = np.random.default_rng(0)
    bfl = expected_bfl_shapes(cfg)
    bfl_file = root / "flux-2-bench.safetensors"
    out = {"bfl": (bfl_file, write_safetensors(bfl_file, bfl, rng))}

    folder = root / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    names = list(diffusers_shapes(bfl).items())
    shards = [dict(names[i::4]) for i in range(4)]  # 4 shards, tensors interleaved across them
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / name, shard, rng)
        weight_map.update({k: name for k in shard})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out["diffusers"] = (folder, total)
    return out


def child(path: str, trim: bool) -> None:
    """Runs in a fresh process: import and warm up everything, then measure one load."""
    import jax
    import psutil

    from flowgen.engine import host_memory, load_transformer

    if not trim:  # A/B: glibc's default behaviour, freed temporaries stay resident
        host_memory._LIBC = None

    jax.devices()
    before = psutil.Process().memory_info().rss
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    tr = load_transformer(path, dtype="float32")
    jax.block_until_ready(tr.params)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    after = psutil.Process().memory_info().rss
    param_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tr.params))
    print(json.dumps(dict(before=before, peak=peak, after=after, params=param_bytes, seconds=seconds, cpu=cpu)))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--layout", choices=["bfl", "diffusers", "both"], default="both")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--no-trim", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, trim=not args.no_trim)

    cfg = bench_config(args.size_gb)
    print(f"config: hidden {cfg.hidden_size}, {cfg.depth} double + {cfg.depth_single_blocks} single blocks, fp32")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    with tempfile.TemporaryDirectory(prefix="flowgen-loadmem-") as tmp:
        checkpoints = write_checkpoints(cfg, Path(tmp))
        layouts = [layout for layout in checkpoints if args.layout in (layout, "both")]
        runs = [(layout, trim) for layout in layouts for trim in (True, False)]
        for layout, trim in runs:
            path, file_bytes = checkpoints[layout]
            command = [sys.executable, __file__, "--child", str(path)] + ([] if trim else ["--no-trim"])
            run = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            m = json.loads(run.stdout.strip().splitlines()[-1])
            growth, kept = m["peak"] - m["before"], m["after"] - m["before"]
            label = f"{layout}{'' if trim else ' (no malloc_trim)'}"
            print(
                f"{label:27s} file {file_bytes / 1e9:.3f} GB, params {m['params'] / 1e9:.3f} GB, "
                f"load {m['seconds']:.1f} s wall / {m['cpu']:.1f} s CPU: peak RSS growth {growth / 1e9:.3f} GB "
                f"= {growth / file_bytes:.2f}x file; RSS after load {kept / file_bytes:.2f}x file"
            )


if __name__ == "__main__":
    main()
