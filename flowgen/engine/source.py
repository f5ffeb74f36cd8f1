"""Where a pipeline's weights live and what kind of model they are, before anything is loaded.

Everything goes through the model cards (`flowgen.engine.catalog.cards.resolve_model`): a card name, an
AIR id, a card's Hugging Face repo, a diffusers pipeline folder (its `model_index.json` says KV or
plain Klein and whether the model is step-distilled), or a BFL single-file transformer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowgen.engine.catalog.cards import ModelCard, resolve_model
from flowgen.errors import CheckpointError


@dataclass
class ModelSource:
    """A resolved model: its folders, kind, defaults and identity (for manifests).

    identity: the card's identity (`ModelCard.identity`, what plan hashes cover); weights: the
    digests of the files actually loaded (`ModelCard.weights_identity`), recorded apart.
    """

    root: Path  # the diffusers pipeline folder (vae/, text_encoder/, tokenizer/, transformer/)
    transformer: Path  # root/transformer, or a BFL single file that replaces it
    name: str
    is_kv: bool
    distilled: bool
    defaults: dict[str, Any] = field(default_factory=dict)  # steps, guidance, width, height
    identity: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] | None = None


def resolve_source(source: str | Path | ModelCard) -> ModelSource:
    """A path, name, AIR id or repo id (resolved to a card), or a card."""
    if isinstance(source, ModelCard):
        return from_card(source)
    if isinstance(source, (str, Path)):
        return from_card(resolve_model(str(source)))
    raise TypeError(f"a model is a card name, AIR id, repo id, path or ModelCard, not {type(source).__name__}")


def from_card(card: ModelCard) -> ModelSource:
    """The source a model card describes; its weights must be present locally."""
    root = Path(card.weights_path())
    if not (root / "model_index.json").is_file():
        raise CheckpointError(f"{root}: no model_index.json; expected a diffusers FLUX.2 [klein] pipeline folder")
    transformer_file = card.weights.transformer_file
    defaults = card.defaults
    return ModelSource(
        root=root,
        transformer=Path(transformer_file) if transformer_file is not None else root / "transformer",
        name=card.id,
        is_kv=card.kv,
        distilled=card.distilled,
        defaults={
            "steps": defaults.steps,
            "guidance": defaults.cfg_scale,
            "width": defaults.width,
            "height": defaults.height,
        },
        identity=card.identity(),
        weights=card.weights_identity(),
    )
