"""The recipe seed's range message is worded as every other range (issue 18, item 25): it read
"seed: Input should be greater than or equal to 0, got -1", pydantic's words, not the house style."""

from __future__ import annotations

import pytest

from flowgen.errors import RecipeError
from flowgen.recipe.api import load_recipe
from flowgen.recipe.spec import SEED_MAX


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, True])
def test_a_seed_out_of_range_is_worded_like_task_seed(tmp_path, seed):
    path = tmp_path / "recipe.yaml"
    path.write_text("version: 1\nname: t\nmodel: flux2-klein-tiny\ntask: {positivePrompt: a cat}\n")
    with pytest.raises(RecipeError) as top:
        load_recipe(path, [f"seed={str(seed).lower()}"])
    with pytest.raises(RecipeError) as task:
        load_recipe(path, [f"task.seed={str(seed).lower()}"])
    allowed = f"must be an integer between 0 and {SEED_MAX}, got {seed!r}"
    assert top.value.problems == [f"seed: {allowed}"]
    assert task.value.problems == [f"task.seed: {allowed}"]
