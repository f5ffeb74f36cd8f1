"""The official Runware SDKs, each in its own venv at the repo root (made by tests/serve/make_sdk_venvs.sh):
the venv's python (the test skips without it) and a client script run by it, one JSON line per case."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENVS = {"old": ROOT / ".venv-sdk-old", "new": ROOT / ".venv-sdk-new"}


def sdk_python(which: str) -> Path:
    python = VENVS[which] / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{VENVS[which].name} is missing: run tests/serve/make_sdk_venvs.sh")
    return python


def run_client(which: str, script: str, cfg: dict, tmp_path: Path) -> dict[str, dict]:
    path = tmp_path / f"client_{which}.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([str(sdk_python(which)), str(path)], input=json.dumps(cfg), capture_output=True,
                          text=True, timeout=90, env=env, cwd=tmp_path)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the {which} SDK client printed nothing (rc {done.returncode}): {done.stderr[-2000:]}"
    return {line["name"]: line for line in lines}
