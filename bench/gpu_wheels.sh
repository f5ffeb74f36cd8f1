#!/usr/bin/env bash
# Fetch, on this machine, the pure-Python wheels the GPU image lacks for bench/gpu_klein9b.py
# (it has jax[cuda], torch, transformers, flax-deps, but no diffusers; flax is pinned to ours).
# They land in .whl/, which git ignores locally; pass `carry: [".whl"]` to the device run and
# start the command with bench/gpu_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  "diffusers==0.42.1" "importlib_metadata" "flax==0.12.8"
ls -la .whl
