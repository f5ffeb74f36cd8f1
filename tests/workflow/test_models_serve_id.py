"""`flowgen models` names the id `flowgen serve` answers to for every card (issue 18, item 21): the
tiny model has no Runware AIR, and `serve` knows it as flowgen:1@1, which `models` did not show."""

from __future__ import annotations

import json

from click.testing import CliRunner

from flowgen.cli import main
from flowgen.engine.catalog.cards import list_cards
from flowgen.serve.tasks import ServedModels


def test_models_shows_the_model_id_serve_answers_to(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWGEN_CACHE", str(tmp_path / "flowgen-cache"))
    served = ServedModels(list_cards())

    rows = json.loads(CliRunner().invoke(main, ["models", "--json"]).output)
    for row in rows:  # each id shown is one the server resolves to that very card
        assert served.card_for(row["serve_model"], "t").name == row["name"]
    [tiny] = [row for row in rows if row["air"] is None]
    assert tiny["serve_model"] == "flowgen:1@1"

    text = CliRunner().invoke(main, ["models"]).output
    assert f"\n{tiny['name']}  flowgen:1@1 (in `flowgen serve`; a recipe's model: is {tiny['name']})\n" in text
