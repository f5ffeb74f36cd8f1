"""The bad-input corpus: every file in bad_inputs/ must fail `flowgen validate` cleanly.

Each case is a recipe whose header says what the error must mention (`# expect: ...`) and which
extra CLI arguments to pass (`# arg: ...`). Most cases run in-process through click's CliRunner
(fast); a handful run `python -m flowgen.cli` in a subprocess to prove the real exit path.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowgen.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*.yaml"))
SUBPROCESS_CASES = ["python-object-tag", "huge-reference", "set-without-equals", "many-problems"]


def header(case: Path, kind: str) -> list[str]:
    return re.findall(rf"^# {kind}: (.*)$", case.read_text(), re.M)


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder` with its size and content hash."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            files[str(path.relative_to(folder))] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return files


def check_failure(case: Path, code: int, stdout: str, stderr: str) -> None:
    assert code == 2, f"{case.name}: exit code {code}\n{stderr}"
    assert "Traceback" not in stderr + stdout
    lines = stderr.splitlines()
    assert lines, f"{case.name}: no error printed"
    assert all(line.startswith("error: ") for line in lines), stderr
    for expected in header(case, "expect"):
        assert expected in stderr, f"{case.name}: {expected!r} not in:\n{stderr}"
    assert stdout == ""


def test_the_corpus_is_big_enough_and_every_case_says_what_it_expects():
    assert len(CASES) >= 40
    assert all(header(case, "expect") for case in CASES)


@pytest.fixture(scope="module")
def corpus_before():
    return snapshot(CORPUS)


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_input_fails_with_one_line_per_problem(case, corpus_before, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to the working folder would show up here
    result = CliRunner().invoke(main, ["validate", str(case), *header(case, "arg")])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    check_failure(case, result.exit_code, result.stdout, result.stderr)
    assert list(tmp_path.iterdir()) == []
    assert snapshot(CORPUS) == corpus_before


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(name, tmp_path):
    case = CORPUS / f"{name}.yaml"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-m", "flowgen.cli", "validate", str(case), *header(case, "arg")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )
    check_failure(case, done.returncode, done.stdout, done.stderr)
    assert list(tmp_path.iterdir()) == []


def test_validate_does_not_import_jax_or_the_runner(tmp_path):
    """`flowgen validate` must stay cheap: no JAX, no engine, no planner/runner imports."""
    code = (
        "import sys; from click.testing import CliRunner; from flowgen.cli import main\n"
        f"r = CliRunner().invoke(main, ['validate', {str(CORPUS.parent.parent.parent / 'recipes/product-photos.yaml')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'torch') or m.startswith(('flowgen.run', 'flowgen.plan')))\n"
        "print(heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
