#!/usr/bin/env bash
# On the device machine (bare 'cuda' image): install the carried wheels, then run the 9B GPU bench.
#   run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=540)
# Output goes to stdout and $OUT/gpu_klein9b.txt; extra arguments go to the bench.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import jax, flax, torch, diffusers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__)"
python3 bench/gpu_klein9b.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_klein9b.txt"
