#!/usr/bin/env bash
# Test-only venvs for the two official Runware SDKs that tests/serve/test_sdks.py drives against
# `flowgen serve`. Both install the module `runware`, so each gets its own venv at the repo root.
# Idempotent: a venv that already imports the pinned version is left as it is.
set -euo pipefail
cd "$(dirname "$0")/../.."
make_venv() {  # folder, pip requirement, version the module must report
  local dir=$1 req=$2 want=$3
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(0 if m.version('${req%%==*}') == '$want' else 1)" 2>/dev/null; then
    return 0
  fi
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/pip" install -q "$req"
}
make_venv .venv-sdk-old runware==0.5.24 0.5.24       # WebSocket-only SDK (its client class is `Runware`)
make_venv .venv-sdk-new runware-sdk==1.8.0 1.8.0     # WebSocket + REST SDK (Runware)
