#!/usr/bin/env bash
# On the device machine (bare 'cuda' image): install the carried wheels, then run the GPU benches.
#   run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=540)
# One prepared call, under 9 minutes: each section has its own time limit, so a slow one cannot
# take the others' output with it. Output goes to stdout and $OUT/*.txt; extra arguments go to the
# per-step bench (gpu_klein9b.py).
#   1. the sampling loop of the 9B at batch 1/2/4/8 (images/s) and, with several GPUs, data-parallel
#      scaling (gpu_klein9b.py --throughput)                                              <= 240 s
#   2. cold vs warm start: time to the first quickstart image in fresh processes with an empty and
#      a filled compile cache, and the load from safetensors vs Orbax (startup.py, tiny model) <= 80 s
#   3. the transformer step, flowgen vs diffusers (gpu_klein9b.py)                          <= 170 s
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import jax, flax, torch, diffusers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__)"
echo "== throughput and scaling"
timeout 240 python3 bench/gpu_klein9b.py --throughput --skip-steps --repeats 2 2>&1 | tee "$OUT_DIR/gpu_throughput.txt"
echo "== cold vs warm start"
timeout 80 python3 bench/startup.py --repeats 1 --json "$OUT_DIR/gpu_startup.json" 2>&1 | tee "$OUT_DIR/gpu_startup.txt"
echo "== transformer step"
timeout 170 python3 bench/gpu_klein9b.py --repeats 2 "$@" 2>&1 | tee "$OUT_DIR/gpu_klein9b.txt"
