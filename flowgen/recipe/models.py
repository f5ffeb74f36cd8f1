"""Model-card lookup for validation: which model a recipe names and whether it is distilled.

Cards come from flowgen.engine.cards (`resolve_model(name) -> card` with .name, .distilled,
.defaults, .kv). When that module is not importable the recipe layer still works: the curated
Runware AIR ids fall back to a small table and every other model gets no model-specific rules.
"""

from __future__ import annotations

from typing import Any

from flowgen.errors import FlowgenError
from flowgen.recipe.spec_values import DISTILLED_AIRS

# Names some cards may use for the two defaults that matter; the request spells them as on the right.
_DEFAULT_ALIASES = {"num_inference_steps": "steps", "guidance_scale": "CFGScale", "cfg_scale": "CFGScale"}
DISTILLED_STEPS = 4


def find_card(model: str) -> tuple[Any, str | None]:
    """(card, None) when found; (None, problem) when the card module rejects the name; (None, None) without cards."""
    try:
        from flowgen.engine.cards import resolve_model
    except ImportError:
        return None, None
    try:
        return resolve_model(model), None
    except (FlowgenError, LookupError, ValueError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        return None, f"model: {message}"


def is_distilled(model: str | None, card: Any) -> bool | None:
    """True/False from the card (or the AIR table); None when nothing is known."""
    if card is not None and getattr(card, "distilled", None) is not None:
        return bool(card.distilled)
    return DISTILLED_AIRS.get(model or "")


def card_defaults(card: Any, distilled: bool | None) -> dict:
    """imageInference defaults from the card (steps, CFGScale, ...), lowest precedence in a task."""
    raw = getattr(card, "defaults", None) or {}
    if hasattr(raw, "model_dump"):  # flowgen.engine.cards.Defaults (pydantic, aliases = request names)
        raw = raw.model_dump(by_alias=True)
    if not isinstance(raw, dict):
        raw = {}
    defaults = {_DEFAULT_ALIASES.get(k, k): v for k, v in raw.items()}
    from flowgen.recipe.task_model import TaskFields

    defaults = {k: v for k, v in defaults.items() if k in TaskFields.model_fields and v is not None}
    if distilled:
        defaults.setdefault("steps", DISTILLED_STEPS)
        if float(defaults.get("CFGScale", 1)) > 1:  # a distilled model runs without guidance
            defaults.pop("CFGScale")
    return defaults


def model_label(model: str | None, card: Any) -> str:
    """How messages name the model: 'runware:400@6 (klein-9b-kv)' when a card is known."""
    name = getattr(card, "name", None)
    return f"{model} ({name})" if name and name != model else str(model)
