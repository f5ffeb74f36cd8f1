"""Where a pipeline's weights live and what kind of model they are, before anything is loaded.

Everything goes through the model cards (`flowgen.engine.cards.resolve_model`): a card name, an
AIR id, a card's Hugging Face repo, a diffusers pipeline folder (its `model_index.json` says KV or
plain Klein and whether the model is step-distilled), or a BFL single-file transformer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowgen.errors import CheckpointError


@dataclass
class ModelSource:
    """A resolved model: its folders, kind, defaults and identity (for manifests)."""

    root: Path  # the diffusers pipeline folder (vae/, text_encoder/, tokenizer/, transformer/)
    transformer: Path  # root/transformer, or a BFL single file that replaces it
    name: str
    is_kv: bool
    distilled: bool
    defaults: dict[str, Any] = field(default_factory=dict)  # steps, guidance, width, height
    identity: dict[str, Any] = field(default_factory=dict)


def resolve_source(source: Any) -> ModelSource:
    """A path, name, AIR id or repo id (resolved to a card), or a card object."""
    from flowgen.engine.cards import resolve_model

    card = resolve_model(str(source)) if isinstance(source, (str, Path)) else source
    return from_card(card)


def from_card(card: Any) -> ModelSource:
    """The source a model card describes; its weights must be present locally."""
    root = Path(card.weights_path())
    if not (root / "model_index.json").is_file():
        raise CheckpointError(f"{root}: no model_index.json; expected a diffusers FLUX.2 [klein] pipeline folder")
    transformer_file = getattr(card.weights, "transformer_file", None)
    defaults = card.defaults
    return ModelSource(
        root=root,
        transformer=Path(transformer_file) if transformer_file else root / "transformer",
        name=card.id,
        is_kv=bool(card.kv),
        distilled=bool(card.distilled),
        defaults={"steps": defaults.steps, "guidance": defaults.cfg_scale, "width": defaults.width,
                  "height": defaults.height},
        identity=card.identity(),
    )
