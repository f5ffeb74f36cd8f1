"""Engine code run in a fresh Python child: the device count, XLA flags and JAX's caches are fixed
when JAX starts, so tests that vary them run their script with `run_python`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def cpu_env(devices: int = 1, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a CPU child with `devices` forced CPU devices: the caller's
    XLA_FLAGS and FLOWGEN_MESH (and any name in `drop`) left out, `extra` added."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FLOWGEN_MESH", *drop)}
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


def run_python(code: str, *args: object, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -c code args...` in the repository root; the test fails with the tail of the child's
    stderr when it exits non-zero."""
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def marked_json(stdout: str, mark: str) -> Any:
    """The JSON a child printed after `mark` at the start of a line (`print("RESULT " + json.dumps(...))`)."""
    line = next(x for x in stdout.splitlines() if x.startswith(mark + " "))
    return json.loads(line[len(mark) + 1 :])
