"""Reference files are opened in one place with the same checks everywhere (issue 18, item 12).

A FIFO, /dev/zero (or a symlink to it) and an oversized file passed `validate`'s own check but sent
`plan` and `run` into an endless read. Now validate, plan (hashing), run, regen, canary and serve all
go through flowgen.engine.references.files: a one-line error naming the file, at once. Every call
that could hang runs under a time limit, so a regression fails instead of stalling CI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowgen.engine.references import files as reference_files
from flowgen.engine.references.files import (
    MAX_REFERENCE_BYTES,
    ReferenceImageError,
    open_reference,
    reference_sha256,
)
from flowgen.engine.references.images import image_header, load_image
from flowgen.plan.references import ReferenceInspector
from flowgen.recipe.validation import image_problem
from flowgen.run.references import ReferenceLoader

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                reason="needs FIFOs and /dev/zero (POSIX)")

FIFO = "is not a regular file (it is a FIFO)"
ZERO = "is not a regular file (it is /dev/zero, a character device)"
BIG = f"is 1,610,612,736 bytes; the limit is {MAX_REFERENCE_BYTES:,} bytes"


def bounded(call, seconds: float = 10.0):
    """call() in a daemon thread: its result or exception, or a failure (not a hang) after `seconds`."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            outcome["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still reading after {seconds:g} s: an unbounded read"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def bad_files(tmp_path) -> dict[str, tuple[Path, str]]:
    """name -> (path, the problem every layer reports for it)."""
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:  # sparse: 1.5 GiB by size, nothing on disk
        handle.truncate(1536 * 1024 * 1024)
    return {"fifo": (fifo, FIFO), "zero": (zero, ZERO), "big": (big, BIG)}


# --- the one opener -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "zero", "big"])
def test_every_layer_refuses_at_once_with_the_same_one_line_problem(kind, bad_files):
    path, problem = bad_files[kind]
    message = f"reference image {path}: {problem}"
    assert bounded(lambda: image_problem(path)) == problem  # validate (and serve's stored inputs)
    for layer in (lambda: ReferenceInspector().inspect(path),  # plan: header and content hash
                  lambda: ReferenceLoader().load(str(path)),  # run, regen, canary, serve
                  lambda: reference_sha256(path),  # regen and canary compare content hashes
                  lambda: load_image(path),  # the engine, given a path
                  lambda: image_header(path)):
        with pytest.raises(ValueError) as err:
            bounded(layer)
        assert str(err.value) == message and "\n" not in message


def test_a_directory_a_missing_file_and_a_symlink_to_a_good_file(tmp_path):
    assert image_problem(tmp_path) == "is not a regular file (it is a directory)"
    assert image_problem(tmp_path / "nope.png") == "does not exist"
    good = tmp_path / "good.png"
    Image.fromarray(np.full((80, 96, 3), 90, np.uint8)).save(good)
    link = tmp_path / "link.png"
    link.symlink_to(good)
    assert image_problem(link) is None
    assert reference_sha256(link) == hashlib.sha256(good.read_bytes()).hexdigest()
    assert ReferenceInspector().inspect(link) == (reference_sha256(good), (96, 80))


def test_a_fifo_swapped_in_after_the_check_is_refused_on_the_open_descriptor(tmp_path, monkeypatch):
    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    regular = os.stat(__file__)  # what the path was when it was checked
    monkeypatch.setattr(reference_files, "_stat", lambda path, label: regular)
    with pytest.raises(ReferenceImageError, match=r"swapped.png: is not a regular file \(it is a FIFO\)$"):
        bounded(lambda: reference_sha256(fifo))  # the open does not block; fstat() sees the FIFO


def test_reads_stop_at_the_byte_limit(tmp_path):
    path = tmp_path / "ref.png"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(ReferenceImageError, match="ref.png: is 5,000 bytes; the limit is 4,096 bytes"):
        reference_sha256(path, max_bytes=4096)
    assert reference_sha256(path, max_bytes=5000) == hashlib.sha256(b"x" * 5000).hexdigest()
    with open_reference(path) as handle:
        assert handle.read() == b"x" * 5000


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(b"x")
    path.chmod(0)
    assert image_problem(path) == "cannot be read (permission denied)"


# --- the commands, in real processes, under a time limit -------------------------------------------

RECIPE = """\
version: 1
name: refs
model: flux2-klein-tiny
seed: 7
datasets:
  refs: {values: [fifo.png, zero.png, big.png]}
matrix:
  ref: refs
task:
  positivePrompt: "A photo"
  width: 256
  height: 256
  steps: 2
  inputs: {referenceImages: ["{ref}"]}
output:
  dir: out
  filename: "{slug}_{result}.{ext}"
"""


def flowgen(command: str, recipe: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "flowgen.cli", command, str(recipe)], check=False, capture_output=True,
                          text=True, cwd=recipe.parent, env=env, timeout=180)


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_validate_plan_and_run_each_give_one_line_per_bad_reference(command, bad_files, tmp_path):
    recipe = tmp_path / "refs.yaml"
    recipe.write_text(RECIPE)
    done = flowgen(command, recipe)  # before the fix plan and run never returned
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    for path, problem in bad_files.values():
        lines = [line for line in output.splitlines() if path.name in line and problem in line]
        assert len(lines) == 1 if command == "validate" else lines, f"{path.name}: {problem!r} not in:\n{output}"
    if command == "validate":
        assert done.returncode == 2 and done.stdout == ""
    elif command == "plan":
        assert "to run: 0 result(s)" in done.stdout
    else:
        assert done.returncode != 0 and not list((tmp_path / "out").glob("*.png"))
