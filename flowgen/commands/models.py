"""`flowgen models`: every model card, whether its weights are on this machine, and how to fetch them.

Looks only (offline, nothing downloaded, the tiny model not written). `weights_note` is the line
`validate` and `plan` print for a recipe whose model's weights are absent; its text is the card's
own `missing_weights()`, the message `run` stops with, so the three commands agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from flowgen.engine import ModelCard, flowgen_cache_dir, list_cards

_SIZES = {"klein-9b": "9B", "klein-4b": "4B", "custom": "custom"}


def models_command(as_json: bool) -> None:
    """Print every built-in model card with its weights' whereabouts (JSON: a list of objects)."""
    rows = [card_status(card) for card in list_cards()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        print_card(row)
    click.echo(
        "Real weights are looked up in the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else "
        "~/.cache/huggingface/hub), never downloaded by flowgen. A recipe's `model:` may also be a local "
        "diffusers folder or a BFL single file (.safetensors)."
    )


def weights_note(card: ModelCard | None) -> str | None:
    """The note (printed as `note: ...`) for a recipe whose model's weights are not on this machine."""
    problem = card.missing_weights() if isinstance(card, ModelCard) else None
    if problem is None:
        return None
    return f"{problem}; `flowgen run` stops until they are there (`flowgen models` lists every model)"


def kind(card: ModelCard) -> str:
    """`9B step-distilled (4 steps, no CFG), reference K/V cache` and the like, from the card's facts."""
    defaults = card.defaults
    if card.tiny is not None:
        return f"tiny random weights in the Klein 9B KV layout, for trying flowgen ({defaults.steps} steps, no CFG)"
    if card.distilled:
        text = f"{_SIZES[card.architecture]} step-distilled ({defaults.steps} steps, no CFG)"
    else:
        text = f"{_SIZES[card.architecture]} base ({defaults.steps} steps, CFG {defaults.cfg_scale:g})"
    return text + (", reference K/V cache" if card.kv else "")


def card_status(card: ModelCard) -> dict[str, Any]:
    """What `models --json` prints for one card."""
    return {
        "name": card.name,
        "air": card.air,
        "serve_model": served_id(card),
        "default": card.default,
        "kind": kind(card),
        "description": card.description,
        "architecture": card.architecture,
        "kv": card.kv,
        "distilled": card.distilled,
        "defaults": card.defaults.model_dump(by_alias=True),
        "weights": weights_status(card),
        "fetch": fetch_instructions(card),
    }


def served_id(card: ModelCard) -> str:
    """The model id `flowgen serve` answers to for this card: its AIR; the tiny model, which has none
    of Runware's, answers to flowgen's own (clients such as runware-sdk insist on the AIR form)."""
    from flowgen.serve.tasks import TINY_AIR  # one definition, the server's

    return card.air or (TINY_AIR if card.tiny is not None else card.name)


def weights_status(card: ModelCard) -> dict[str, Any]:
    """present, path (when present), looked_in (where flowgen looks), source and problem (when absent)."""
    if card.tiny is not None:
        folder = flowgen_cache_dir() / "models"
        return {
            "present": True,
            "embedded": True,
            "path": None,
            "looked_in": str(folder),
            "source": "embedded in flowgen (random weights, written on first use)",
            "problem": None,
        }
    problem = card.missing_weights()
    path = None if problem else str(card.weights_path())
    if card.weights.path is not None:
        looked_in, source = str(card.weights.path), "local folder"
    else:
        assert card.weights.hf_repo is not None  # a real card names a local folder or an HF repo
        looked_in, source = str(_hf_cache_folder(card.weights.hf_repo)), f"huggingface.co/{card.weights.hf_repo}"
    return {
        "present": problem is None,
        "embedded": False,
        "path": path,
        "looked_in": looked_in,
        "source": source,
        "gated": card.weights.gated,
        "problem": problem,
    }


def fetch_instructions(card: ModelCard) -> dict[str, Any] | None:
    """How to get a real card's weights: the download command (None for the embedded tiny model)."""
    if card.tiny is not None:
        return None
    if card.weights.hf_repo is None:
        return {"command": None, "note": f"put a complete diffusers pipeline folder at {card.weights.path}"}
    repo = card.weights.hf_repo
    note = (
        f"gated: accept the licence on https://huggingface.co/{repo} and set HF_TOKEN (or run `hf auth login`) first"
        if card.weights.gated
        else ""
    )
    return {
        "command": f"hf download {repo}",
        "alternative": f"huggingface-cli download {repo}",
        "local_dir": f"hf download {repo} --local-dir DIR, then model: DIR in the recipe",
        "gated": card.weights.gated,
        "note": note,
    }


def print_card(row: dict[str, Any]) -> None:
    if row["air"]:
        air = row["air"]
    else:  # only `serve` knows the id: a recipe names the card
        air = f"{row['serve_model']} (in `flowgen serve`; a recipe's model: is {row['name']})"
    click.echo(f"{row['name']}  {air}" + ("  [default]" if row["default"] else ""))
    click.echo(f"  kind:    {row['kind']}")
    weights = row["weights"]
    if weights["embedded"]:
        click.echo(f"  weights: always present (embedded; written on first use to {weights['looked_in']})")
    elif weights["present"]:
        click.echo(f"  weights: on this machine: {weights['path']}")
    elif Path(weights["looked_in"]).exists():
        click.echo(f"  weights: not usable: {weights['problem']}")
    else:
        click.echo(f"  weights: not on this machine (looked in {weights['looked_in']})")
    fetch = row["fetch"]
    if fetch and not weights["present"]:
        if fetch["command"]:
            click.echo(f"  fetch:   {fetch['command']}   (or {fetch['alternative']})")
            if fetch["note"]:
                click.echo(f"           {fetch['note']}")
        else:
            click.echo(f"  fetch:   {fetch['note']}")


def _hf_cache_folder(repo: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
