"""The persistent compilation cache: on by default under the flowgen cache, FLOWGEN_COMPILE_CACHE
to move or turn it off, and a second process compiles nothing.

The proof runs two fresh processes on one cache folder, each rendering the quickstart and an
edit recipe (two references per image) with the tiny model; counts come from JAX's own
monitoring events (`compile_cache.stats`): the second process hands XLA the same programs and
every one of them is a cache hit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowgen.engine.runtime import compile_cache
from flowgen.errors import CheckpointError
from tests.engine.child_python import ROOT, marked_json, run_python

SMALL = ["model=flux2-klein-tiny", "task.width=128", "task.height=128", "task.steps=2"]

_RUNS = """
import json, sys
from flowgen.engine.runtime import compile_cache
compile_cache.watch()
from flowgen.commands.run import run_command
recipes, out = sys.argv[1], sys.argv[2]
small = {small!r}
assert run_command(recipes + "/quickstart.yaml", out + "/quick", small, None, False) == 0
products = small + ["datasets.products.filter.sku=[C-300]", "include=[]", "task.numberResults=1"]
assert run_command(recipes + "/product-photos.yaml", out + "/products", products, None, False) == 0
from flowgen.run.manifest import Manifest
with Manifest(out + "/quick", create=False) as manifest:
    print("STARTUP " + json.dumps(manifest.runs()[-1]["summary"]["startup"]))
print("STATS " + json.dumps(vars(compile_cache.stats())) + " DIR " + str(compile_cache.in_use()))
"""


def _render(recipes: Path, out: Path, env: dict) -> tuple[dict, str]:
    done = run_python(_RUNS.format(small=SMALL), recipes, out, env=env)
    lines = done.stdout.splitlines()
    stats, _, folder = next(x for x in lines if x.startswith("STATS "))[len("STATS ") :].partition(" DIR ")
    startup = marked_json(done.stdout, "STARTUP")
    return {**json.loads(stats), "startup": startup}, folder


@pytest.mark.slow
def test_a_second_process_compiles_nothing(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name in ("quickstart.yaml", "product-photos.yaml", "data", "refs"):
        source = ROOT / "recipes" / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, recipes / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWGEN_", "JAX_COMPILATION"))}
    env.update(FLOWGEN_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")

    first, folder = _render(recipes, tmp_path / "first", env)
    assert Path(folder) == tmp_path / "cache" / "jax-compile"  # the default: under FLOWGEN_CACHE
    assert first["programs"] > 10 and first["cache_requests"] == first["programs"]
    assert first["cache_hits"] == 1  # the quickstart's loop steps, compiled ahead of time, read back by its batch
    written = [entry for entry in Path(folder).iterdir() if entry.name != compile_cache.AHEAD_MARKS]
    assert len(written) == first["programs"] - first["cache_hits"]  # every program written
    assert any((Path(folder) / compile_cache.AHEAD_MARKS).iterdir())  # and what was compiled ahead, noted

    second, _ = _render(recipes, tmp_path / "second", env)
    # the same programs, none compiled ahead again (their notes say they are in the cache): each once
    assert second["programs"] == first["programs"] - first["cache_hits"]
    assert second["cache_hits"] == second["cache_requests"] == second["programs"]  # nothing compiled

    # the run record's start-up report (the quickstart run: the process's first, which loads the weights)
    cold, warm = first["startup"], second["startup"]
    assert set(cold) == {"load", "ahead", "compile", "programs", "cache_hits", "first_image"}
    assert 0 < cold["load"] < cold["first_image"] and cold["compile"] > warm["compile"] > 0  # (summed over threads)
    assert cold["cache_hits"] == 1 < cold["programs"] - cold["cache_hits"] == warm["programs"] == warm["cache_hits"]
    assert 0 < cold["ahead"] < cold["load"]


def _fresh_setting(monkeypatch, **env):
    for key in ("FLOWGEN_COMPILE_CACHE", "FLOWGEN_CACHE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return compile_cache.setting()


def test_the_setting_follows_the_environment(monkeypatch, tmp_path):
    assert _fresh_setting(monkeypatch, FLOWGEN_CACHE=str(tmp_path)) == tmp_path / "jax-compile"
    assert _fresh_setting(monkeypatch, FLOWGEN_COMPILE_CACHE="off") is None
    assert _fresh_setting(monkeypatch, FLOWGEN_COMPILE_CACHE="OFF") is None
    assert _fresh_setting(monkeypatch, FLOWGEN_COMPILE_CACHE=str(tmp_path / "x")) == tmp_path / "x"


def _enable_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = (
        "from flowgen.engine.runtime import compile_cache\n"
        "import jax\n"
        "print(compile_cache.enable(), jax.config.jax_enable_compilation_cache,"
        " jax.config.jax_persistent_cache_min_compile_time_secs)\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWGEN_", "JAX_COMPILATION"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_off_turns_the_cache_off_and_a_folder_moves_it(tmp_path):
    off = _enable_in_subprocess({"FLOWGEN_COMPILE_CACHE": "off", "FLOWGEN_CACHE": str(tmp_path)})
    assert off.returncode == 0 and off.stdout.split() == ["None", "False", "1.0"], off.stderr[-2000:]
    moved = _enable_in_subprocess({"FLOWGEN_COMPILE_CACHE": str(tmp_path / "mine")})
    assert moved.returncode == 0 and moved.stdout.split() == [str(tmp_path / "mine"), "True", "0.0"], moved.stderr


def test_an_explicit_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLOWGEN_COMPILE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(compile_cache, "_decided", False)
    with pytest.raises(CheckpointError) as err:
        compile_cache.enable()
    assert "FLOWGEN_COMPILE_CACHE" in str(err.value) and "\n" not in str(err.value)
