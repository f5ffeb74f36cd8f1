"""A batch of edits with a different reference each: one sampling loop vs one loop per reference set.

The product-photo case: 8 edits, each with its own packshot, packshots of 3 sizes. Before issue 8
`Pipeline.generate` regrouped the batch by reference set and ran 8 sampling loops at batch 1; now it
runs one loop over the batch with per-row reference K/V padded to a length bucket and masked.

The script times the same `generate` call on two source trees — the current one and an older commit
checked out with `git worktree` — each in its own subprocess on the same random mid-size model
(bench/pipeline.py's), calls alternating between the two, and prints seconds per image (after a
warm-up call; best of `--repeats` rounds) and the ratio. Compile time (first call minus best) is printed apart.

    git worktree add /tmp/flowgen-before 390dd43      # the last commit before one-loop batches
    JAX_PLATFORMS=cpu .venv/bin/python bench/distinct_references.py --before /tmp/flowgen-before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]

# (width, height) of the 8 packshots: three sizes, as a catalogue mixes them
PACKSHOTS = [(192, 256), (256, 192), (224, 224)] * 2 + [(192, 256), (256, 192)]
SIZE, STEPS = 256, 4


def worker(model: Path) -> None:
    """Runs inside a subprocess whose sys.path starts at the tree being measured: one timed
    `generate` call per line read from stdin, its timings printed as one JSON line."""
    import numpy as np
    from PIL import Image

    from flowgen.engine.pipeline import Pipeline

    rng = np.random.default_rng(0)
    references = []
    for width, height in PACKSHOTS:
        coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        references.append([Image.fromarray(np.repeat(np.repeat(coarse, 16, 0), 16, 1)[:height, :width].copy())])
    prompts = [f"product {i} on a marble table, soft light" for i in range(len(PACKSHOTS))]
    pipe = Pipeline.from_pretrained(model)
    for _ in sys.stdin:
        pipe.clear_caches()  # cold: every edit encodes its packshot and runs its K/V pre-pass
        start = time.perf_counter()
        out = pipe.generate(prompts, references=references, width=SIZE, height=SIZE, steps=STEPS,
                            seeds=list(range(len(prompts))))
        print(json.dumps({"seconds": time.perf_counter() - start, "stages": out.timings}), flush=True)


class Side:
    """One source tree's worker process."""

    def __init__(self, tree: Path, model: Path):
        code = ("import sys; sys.path[:0] = sys.argv[1:3]; import distinct_references as d;"
                "from pathlib import Path; d.worker(Path(sys.argv[3]))")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(tree), str(Path(__file__).parent), str(model)],
                                     cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.first, self.best = None, None

    def call(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        while not line.startswith("{"):  # skip anything the library printed
            if not line:
                raise RuntimeError(f"the worker for {self.proc.args[3]} died")
            line = self.proc.stdout.readline()
        result = json.loads(line)
        if self.first is None:
            self.first = result
        elif self.best is None or result["seconds"] < self.best["seconds"]:
            self.best = result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree of the older commit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(1, str(Path(__file__).parent))
    from pipeline import write_model  # bench/pipeline.py's mid-size random model

    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp))
        sides = {"before": Side(args.before.resolve(), model), "after": Side(REPO, model)}
        for _ in range(args.repeats + 1):  # interleaved rounds: load from other jobs hits both alike
            for side in sides.values():
                side.call()
        for side in sides.values():
            side.close()
    n = len(PACKSHOTS)
    sizes = ", ".join(f"{w}x{h}" for w, h in PACKSHOTS[:3])
    print(f"{n} edits at {SIZE}x{SIZE}, {STEPS} steps, 1 packshot each ({sizes}); "
          f"seconds per image, best of {args.repeats} interleaved rounds after a warm-up")
    for name, side in sides.items():
        stages = ", ".join(f"{k} {v / n:.3f}" for k, v in side.best["stages"].items())
        compile_s = side.first["seconds"] - side.best["seconds"]
        print(f"  {name:6s} {side.best['seconds'] / n:.3f} s/image (first call {compile_s:.1f} s longer: compile); {stages}")
    ratio = sides["before"].best["seconds"] / sides["after"].best["seconds"]
    print(f"  speed-up (before / after): {ratio:.2f}x")


if __name__ == "__main__":
    main()
