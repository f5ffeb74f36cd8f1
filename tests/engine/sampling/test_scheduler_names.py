"""The spec's 75 scheduler names: each resolves to (sampler, sigma schedule) or is refused in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flowgen.engine.sampling import names, schedules
from flowgen.engine.sampling.base import Sampler
from flowgen.errors import RecipeError
from flowgen.recipe import spec as spec_values
from flowgen.recipe.api import expand_items, load_recipe

ROOT = Path(__file__).parents[3]


def test_the_table_covers_exactly_the_spec_names():
    assert len(spec_values.SCHEDULERS) == 75
    assert set(names.SUPPORTED) | set(names.REFUSED) == set(spec_values.SCHEDULERS)
    assert not set(names.SUPPORTED) & set(names.REFUSED)
    assert set(names.REFUSED) == {"DPMSolverMultistepInverse"}


@pytest.mark.parametrize("name", spec_values.SCHEDULERS)
def test_every_spec_name_resolves_or_is_refused_in_one_line(name):
    if name in names.REFUSED:
        with pytest.raises(names.SchedulerRefused) as err:
            names.resolve(name)
        message = str(err.value)
        assert "\n" not in message and name in message and "'DPMSolverMultistepScheduler'" in message
        return
    choice = names.resolve(name)
    assert choice.name == name and choice.sampler_name in names.SAMPLERS
    sampler = choice.sampler()
    assert isinstance(sampler, Sampler) and sampler.stochastic == choice.stochastic
    hash(sampler)  # a static argument of the compiled loop
    for steps, tokens in [(1, 256), (4, 4096), (28, 1024)]:
        sigmas = choice.sigmas(steps, tokens)
        assert sigmas.dtype == np.float32 and sigmas.shape == (steps + 1,) and sigmas[-1] == 0
        assert sigmas[0] <= 1 and np.all(np.diff(sigmas) < 0), (name, sigmas)


def test_none_is_default_and_unknown_names_list_what_is_supported():
    assert names.resolve(None) == names.resolve("Default") == names.SchedulerChoice("Default", "euler", "default")
    with pytest.raises(names.SchedulerRefused) as err:
        names.resolve("Eular a")
    message = str(err.value)
    assert "\n" not in message and "'Eular a'" in message and all(n in message for n in names.SUPPORTED)
    assert isinstance(err.value, ValueError)


def test_reading_the_table_and_building_sigmas_imports_no_jax():
    code = ("import sys; from flowgen.engine.sampling import names; c = names.resolve('DPM++ 2M SDE Beta'); "
            "c.sigmas(8, 4096); names.resolve('UniPC 3M Karras').sigmas(4, 256); "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("name, sampler, schedule", [
    ("DPM++ 2M Karras", "dpmpp_2m", "karras"),
    ("DPM++ Uniform Karras", "dpmpp_2m", "karras"),
    ("DPM++ 3M SDE Uniform", "dpmpp_3m_sde", "uniform"),
    ("Euler a", "euler_ancestral", "default"),
    ("UniPC 3M", "unipc_3m", "default"),
    ("DPMSolverMultistepScheduler", "dpmsolver_multistep", "diffusers_flow"),
    ("EDMEulerScheduler", "euler", "karras"),
])
def test_examples(name, sampler, schedule):
    assert names.resolve(name) == names.SchedulerChoice(name, sampler, schedule)


def test_karras_family_shares_the_default_end_points():
    default = schedules.default(8, 4096)
    for schedule in ("karras", "exponential", "beta", "uniform"):
        sigmas = schedules.sigmas(schedule, 8, 4096)
        assert sigmas[0] == default[0] == 1 and sigmas[-2] == default[-2] and sigmas[-1] == 0
        assert not np.array_equal(sigmas, default)


def test_docs_table_matches_the_code():
    docs = (ROOT / "docs" / "recipes.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (`[^`]+` on `[^`]+`|refused[^|]*) \|", docs, re.M))
    assert set(rows) == set(spec_values.SCHEDULERS), set(spec_values.SCHEDULERS) ^ set(rows)
    for name, cell in rows.items():
        if name in names.REFUSED:
            assert cell.startswith("refused")
        else:
            choice = names.resolve(name)
            assert cell == f"`{choice.sampler_name}` on `{choice.schedule_name}`", name


# ---- the recipe layer ------------------------------------------------------------------------------


def _recipe(tmp_path, scheduler):
    recipe = {"version": 1, "name": "t", "model": "runware:400@6",
              "task": {"positivePrompt": "a cat", "width": 256, "height": 256, "scheduler": scheduler}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return load_recipe(path)


@pytest.mark.parametrize("scheduler", ["DPM++ 2M Karras", "Euler a", "UniPC 3M Uniform", "LCM", "Default"])
def test_a_recipe_with_a_supported_scheduler_validates(tmp_path, scheduler):
    items = expand_items(_recipe(tmp_path, scheduler))
    assert items[0].task["scheduler"] == scheduler


def test_a_recipe_with_a_refused_or_unknown_scheduler_gets_one_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        expand_items(_recipe(tmp_path, "DPMSolverMultistepInverse"))
    (problem,) = err.value.problems
    assert problem.startswith("task.scheduler: not supported yet by the local engine") and "\n" not in problem
    assert "DPMSolverMultistepScheduler" in problem
    with pytest.raises(RecipeError) as err:
        expand_items(_recipe(tmp_path, "Eular a"))
    (problem,) = err.value.problems
    assert problem.startswith("task.scheduler: must be one of the 75 scheduler names") and "Euler a" in problem
