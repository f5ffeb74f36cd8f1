"""What a device mesh costs on one CPU: a batch of 8 on one device vs 8 forced CPU devices.

Each configuration runs in its own process (the device count is fixed when JAX starts):
`XLA_FLAGS=--xla_force_host_platform_device_count=8` with the default mesh (data=8: each device
runs the one-device program on its row) and with `data=4,model=2` (block weights split, gathered a
layer at a time), against one device. The 8 devices share the machine's cores, so this measures
the mesh's overhead (program splitting, transfers, gathers), never a speed-up. Seconds per batch:
best of `--repeats` warm `Pipeline.generate` calls (text-to-image, 8 prompts, 4 steps), and the
first call apart (compile included).

    JAX_PLATFORMS=cpu .venv/bin/python bench/mesh_overhead.py            # tiny model
    JAX_PLATFORMS=cpu .venv/bin/python bench/mesh_overhead.py --mid      # + bench/pipeline.py's mid-size model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_WORKER = r"""
import json, sys, time
from flowgen.engine import Pipeline, RuntimeConfig
model, mesh, size, repeats = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4])
pipe = Pipeline.from_pretrained(model, runtime=RuntimeConfig(mesh=mesh))
kwargs = dict(prompts=[f"prompt {i}" for i in range(8)], seeds=list(range(8)), width=size, height=size, steps=4)
start = time.perf_counter()
pipe.generate(**kwargs)
first = time.perf_counter() - start
best = float("inf")
for _ in range(repeats):
    start = time.perf_counter()
    pipe.generate(**kwargs)
    best = min(best, time.perf_counter() - start)
print("RESULT " + json.dumps({"mesh": pipe.mesh_text, "first": first, "best": best}))
"""

CONFIGS = (("1 device", 1, ""), ("8 devices, data=8", 8, ""), ("8 devices, data=4,model=2", 8, "data=4,model=2"))


def run(model: str, devices: int, mesh: str, size: int, repeats: int, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FLOWGEN_MESH")}
    env.update(FLOWGEN_CACHE=str(cache))
    env.setdefault("JAX_PLATFORMS", "cpu")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, model, mesh, str(size), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mid", action="store_true", help="also the mid-size random model (bench/pipeline.py)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flowgen-mesh-") as tmp:
        models = [("tiny", "flux2-klein-tiny", 256)]
        if args.mid:
            sys.path.insert(0, str(REPO / "bench"))
            from pipeline import write_model

            models.append(("mid-size", str(write_model(Path(tmp) / "mid")), 256))
        for label, model, size in models:
            print(f"{label} model, batch of 8 at {size}x{size}, 4 steps (seconds per batch, best of {args.repeats})")
            base = None
            for name, devices, mesh in CONFIGS:
                result = run(model, devices, mesh, size, args.repeats, Path(tmp) / "cache")
                base = base or result["best"]
                print(
                    f"  {name:<28} {result['best']:7.2f} s  ({result['best'] / base:4.2f}x)   "
                    f"first call {result['first']:6.2f} s   [{result['mesh']}]"
                )


if __name__ == "__main__":
    main()
