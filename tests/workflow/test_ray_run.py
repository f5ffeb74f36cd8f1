"""`flowgen run --ray` on a local Ray cluster (2 CPUs) with the real tiny model: an actor SIGKILLed
mid-run is restarted and its batch retried, and the folder still holds each result exactly once,
byte-identical to a single-process run; `--ray` without Ray, or with an unreachable address, is one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from flowgen.cli import main as cli
from flowgen.commands.run import run_command

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = ["model=flux2-klein-tiny", "task.width=128", "task.height=128", "task.steps=2", "task.numberResults=6"]
TIMEOUT = 300


def _files(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and ".flowgen" not in p.parts
            and p.name not in ("manifest.jsonl",)}


def _actors(proc: subprocess.Popen) -> list[psutil.Process]:
    """The Ray actor processes this run started (its own descendants only)."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "MapWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_retried_and_every_result_lands_once(tmp_path, monkeypatch):
    pytest.importorskip("ray.data")
    recipe = tmp_path / "quickstart.yaml"
    shutil.copy(ROOT / "recipes" / "quickstart.yaml", recipe)
    monkeypatch.setenv("FLOWGEN_MAX_BATCH", "4")
    single = tmp_path / "single"
    assert run_command(str(recipe), str(single), OPTIONS, None, False) == 0
    expected = _files(single)
    assert len(expected) == 24

    out = tmp_path / "ray"
    args = [sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--out", str(out), "--ray"]
    args += [a for option in OPTIONS for a in ("--set", option)]
    env = {**os.environ, "FLOWGEN_MAX_BATCH": "4", "JAX_PLATFORMS": "cpu"}  # this machine (and CI) has 2 CPUs: a 2-CPU local cluster
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed = None
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None and killed is None:
            if any(out.glob("*.png")):  # the actors render: kill one in the middle of its next batch
                actors = _actors(proc)
                if actors:
                    killed = actors[0].pid
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        log = proc.communicate(timeout=TIMEOUT)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed is not None, log[-3000:]
    assert proc.returncode == 0, log[-3000:]
    assert "24 rendered, 0 unchanged, 0 failed" in log, log[-3000:]

    assert _files(out) == expected  # exactly the 24 images (no temp file, nothing twice), the same bytes
    report = json.loads(CliRunner().invoke(cli, ["status", str(out), "--json"]).output)
    assert report["counts"] == {"ok": 24} and report["not_rendered"] == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24 == len({(r["item_id"], r["result_index"]) for r in rows})
    assert {r["batch"]["size"] for r in rows} == {4}


@pytest.mark.slow
def test_ray_unreachable_address_is_one_line_and_nothing_is_written(tmp_path):
    pytest.importorskip("ray.data")
    recipe = tmp_path / "quickstart.yaml"
    shutil.copy(ROOT / "recipes" / "quickstart.yaml", recipe)
    args = [sys.executable, "-m", "flowgen.cli", "run", str(recipe), "--out", str(tmp_path / "out"),
            "--ray=127.0.0.1:9", "--set", "model=flux2-klein-tiny"]
    result = subprocess.run(args, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                            timeout=TIMEOUT, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: --ray 127.0.0.1:9: cannot connect to the Ray cluster")
    assert not (tmp_path / "out").exists()


def test_ray_without_the_extra_is_one_line(tmp_path, monkeypatch):
    recipe = tmp_path / "quickstart.yaml"
    shutil.copy(ROOT / "recipes" / "quickstart.yaml", recipe)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if flowgen[ray] were not installed
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "out"), "--ray",
                                      "--set", "model=flux2-klein-tiny"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --ray needs Ray Data, which is not installed: pip install 'flowgen[ray]'"
    assert not (tmp_path / "out").exists()
