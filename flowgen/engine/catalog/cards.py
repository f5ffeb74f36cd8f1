"""Model cards: which model a recipe means, where its weights are, and its defaults.

Cards are data — one YAML file per variant in the repository's `models/` folder, shipped inside the
wheel as `flowgen/models/` (see setup.py). `resolve_model` accepts a card name (`klein-9b-kv`), an
AIR id (`runware:400@6`), a Hugging Face repo id of a card, or a local path: a diffusers pipeline
folder, or a BFL single-file transformer checkpoint (which then replaces only the transformer; the
text encoder and VAE still come from the card's repo).

Real weights are never downloaded implicitly and a missing checkpoint is never replaced by the tiny
model: `weights_path()` raises CheckpointError saying how to get them.

`ModelCard` is the one typed form of a card, wherever it travels (recipe validation, the planner,
the engine): a frozen pydantic model, validated when read (`load_card`) or derived from a local
path (`ModelCard.replace` re-validates). This module is a bottom layer: it imports no JAX, and the
recipe layer imports it directly.

Identity: `identity()` (what plan content hashes cover) is made of card facts only, so it is the
same with or without the weights on this machine; `weights_identity()` (file digests, HF revision)
is recorded apart, in the engine identity every result's manifest record keeps under "engine".
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flowgen.engine.weights import locate
from flowgen.errors import CheckpointError
from flowgen.safe_yaml import read_yaml_file

Architecture = Literal["klein-9b", "klein-4b", "tiny", "custom"]  # transformer config names (+ tiny, custom)
_PIPELINE_CLASSES = {"Flux2KleinKVPipeline": True, "Flux2KleinPipeline": False}  # class -> kv
_BFL_PREFIX = "model.diffusion_model."  # ComfyUI-style single files nest the transformer under this


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StepRange(_Strict):
    min: int = Field(1, ge=1)
    max: int = Field(50, ge=1)


class Limits(_Strict):
    steps: StepRange = StepRange()
    cfg: bool = False  # whether CFGScale other than 1.0 is allowed


class Defaults(_Strict):
    steps: int = Field(ge=1)
    cfg_scale: float = Field(alias="CFGScale", ge=1.0)
    width: int = Field(multiple_of=16, ge=64)
    height: int = Field(multiple_of=16, ge=64)


class Weights(_Strict):
    hf_repo: str | None = None  # Hugging Face repo in the diffusers layout
    gated: bool = False  # needs an accepted licence and a token (HF_TOKEN)
    single_file: str | None = None  # BFL's file name for this variant, to recognise local files
    path: Path | None = None  # a local diffusers pipeline folder (overrides hf_repo)
    transformer_file: Path | None = None  # a local BFL single file that replaces transformer/


class TinySpec(_Strict):
    seed: int = 0
    sizes: dict[str, int | list[int]] = {}


class ModelCard(_Strict):
    name: str
    air: str | None = None
    default: bool = False
    description: str = ""
    architecture: Architecture
    kv: bool
    distilled: bool
    defaults: Defaults
    limits: Limits = Limits()
    weights: Weights = Weights()
    tiny: TinySpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.distilled and (self.limits.cfg or self.defaults.cfg_scale != 1.0):
            raise ValueError("a distilled model takes no CFG: limits.cfg must be false and CFGScale 1.0")
        if not self.limits.steps.min <= self.defaults.steps <= self.limits.steps.max:
            raise ValueError(f"defaults.steps {self.defaults.steps} is outside limits.steps")
        if (self.tiny is None) == (self.architecture == "tiny"):
            raise ValueError("architecture 'tiny' and a tiny: section go together")
        if self.tiny is None and not (self.weights.hf_repo or self.weights.path):
            raise ValueError("weights need an hf_repo or a local path")
        return self

    @property
    def id(self) -> str:
        """The id to show users and write to manifests: the AIR if the card has one, else its name."""
        return self.air or self.name

    def transformer_config(self):
        """The Flux2Config this card's transformer has (for 'custom': read from the weights folder)."""
        from flowgen.engine.transformer.config import Flux2Config

        if self.architecture == "tiny":
            from flowgen.engine.catalog.tiny_model import TRANSFORMER

            return TRANSFORMER
        if self.architecture == "custom":
            return Flux2Config.from_diffusers(self.weights_path() / "transformer")
        return Flux2Config.named(self.architecture)

    def weights_path(self, *, download: bool = False) -> Path:
        """The local diffusers pipeline folder (with model_index.json) to load this model from.

        Tiny card: written on first use to the flowgen cache. Real cards: `weights.path`, else the
        Hugging Face cache (offline lookup; `download=True` fetches the repo). When
        `weights.transformer_file` is set, the loader takes the transformer from that file instead.
        """
        label = f"{self.name} ({self.id})" if self.air else self.name
        if self.tiny is not None:
            return locate.tiny_folder(self.name, self.tiny.seed)
        if self.weights.path is not None:
            return locate.check_pipeline_folder(
                Path(self.weights.path), label=label, hint="pass a complete diffusers pipeline folder"
            )
        assert self.weights.hf_repo is not None  # _consistent: a real card has a local path or an hf_repo
        return locate.hf_snapshot(self.weights.hf_repo, gated=self.weights.gated, label=label, download=download)

    def missing_weights(self) -> str | None:
        """None when this card's weights are on this machine, else why not and how to fetch them.

        The text is the CheckpointError `weights_path()` raises, so `run` (which stops with it) and
        `validate` / `plan` / `models` (which only mention it) say the same thing. Offline lookup;
        the tiny card counts as present without being written (it is, on first use).
        """
        if self.tiny is not None:
            return None
        try:
            self.weights_path()
        except CheckpointError as err:
            return str(err)
        return None

    def identity(self) -> dict:
        """What identifies this model in plan content hashes and manifests: facts of the card only.

        Name, AIR, architecture, kv, distilled and where the weights come from (HF repo, local
        folder, single file); for the tiny card its seed and a hash of its spec (which determine
        its bytes). Never looks at the weights, so it is the same before and after a download (a
        plan made on a machine without the weights matches the one made after `hf download`); the
        weight files' digests, when present, are `weights_identity()`, recorded apart.
        """
        out: dict[str, Any] = {
            "name": self.name,
            "air": self.air,
            "architecture": self.architecture,
            "kv": self.kv,
            "distilled": self.distilled,
        }
        if self.tiny is not None:
            from flowgen.engine.catalog import tiny_model

            out["tiny"] = tiny_model.identity(self.tiny.seed)
            return out
        out["source"] = str(self.weights.path) if self.weights.path is not None else self.weights.hf_repo
        if self.weights.transformer_file is not None:
            out["transformer_file"] = str(self.weights.transformer_file)
        return out

    def weights_identity(self) -> dict | None:
        """Digests of the weight files on this machine, for the engine's record; None when absent.

        Cheap (never hashes gigabytes): per file of the weights folder, files up to 16 MiB (configs,
        tokenizer) are hashed whole; a larger file gets the SHA-256 the Hugging Face cache already
        names its blob by, or — outside the cache — a SHA-256 of its size, its safetensors header
        and two 64 KiB samples of its data (`sampled-sha256`), which still tells apart fine-tunes
        with identical tensor layouts. `revision`: the HF snapshot (commit) the files come from.
        None for the tiny card (its files are a function of `identity()`) and when the weights are
        not on this machine; never raises for missing weights. Not part of any content hash.
        """
        if self.tiny is not None:
            return None
        try:
            folder = self.weights_path()
        except CheckpointError:
            return None
        files = {
            str(f.relative_to(folder)): locate.file_digest(f)
            for f in sorted(folder.rglob("*"))
            if f.is_file() and not f.name.startswith(".")
        }
        if self.weights.transformer_file is not None:
            files["<transformer_file>"] = locate.file_digest(Path(self.weights.transformer_file))
        revision = folder.name if self.weights.path is None and folder.parent.name == "snapshots" else None
        return {"revision": revision, "files": files}

    def replace(self, **changes) -> ModelCard:
        """A copy with `changes`, validated like a card read from YAML (model_copy would skip that)."""
        return ModelCard.model_validate({**self.model_dump(), **changes})


# ---------------------------------------------------------------------------------------------
# finding cards


def cards_dir() -> Path:
    """The folder holding the card YAML files: inside the installed package, else the source tree."""
    try:
        packaged = resources.files("flowgen") / "models"
        if packaged.is_dir():
            return Path(str(packaged))
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[3] / "models"  # flowgen/engine/catalog/cards.py -> the repository root


@functools.cache
def _load_cards(folder: Path) -> tuple[ModelCard, ...]:
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise CheckpointError(f"{folder}: no model cards found (is flowgen installed correctly?)")
    cards = tuple(load_card(f) for f in files)
    for attr in ("name", "air"):
        values = [getattr(c, attr) for c in cards if getattr(c, attr)]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise CheckpointError(f"{folder}: several model cards share the {attr} {', '.join(duplicates)}")
    if sum(c.default for c in cards) != 1:
        raise CheckpointError(f"{folder}: exactly one model card must say default: true")
    return cards


def load_card(path: str | Path) -> ModelCard:
    """Read and validate one card YAML file. Raises CheckpointError naming the file."""
    path = Path(path)
    data = read_yaml_file(path, kind="model card", error=CheckpointError)  # a recipe's bounds (flowgen.limits)
    try:
        card = ModelCard.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "card"
        raise CheckpointError(f"{path}: invalid model card: {where}: {first['msg']}") from None
    if card.tiny is not None:
        _check_tiny_sizes(card.tiny, path)
    return card


def list_cards() -> list[ModelCard]:
    """All built-in cards, the default first, then by name."""
    return sorted(_load_cards(cards_dir()), key=lambda c: (not c.default, c.name))


def default_card() -> ModelCard:
    return list_cards()[0]


def resolve_model(model: str | None = None, *, variant: str | None = None) -> ModelCard:
    """The card for a model string: card name, AIR, card HF repo id, or a local folder / file.

    None means the default card. `variant` (a card name or AIR) says which Klein variant a BFL
    single file is when its file name does not. Raises CheckpointError listing the known ids.
    """
    if model is None or not str(model).strip():
        return default_card()
    text = str(model).strip()
    for card in list_cards():
        keys = {card.name.lower(), (card.air or "").lower(), (card.weights.hf_repo or "").lower()}
        if text.lower() in keys - {""}:
            return card
    path = Path(text).expanduser()
    if path.is_dir():
        return _card_from_folder(path)
    if path.is_file():
        return _card_from_single_file(path, variant)
    known = ", ".join(f"{c.name} ({c.air})" if c.air else c.name for c in list_cards())
    if os.sep in text or text.endswith(".safetensors"):
        raise CheckpointError(f"model {text!r}: no such file or folder; known models: {known}")
    raise CheckpointError(f"unknown model {text!r}; known models: {known}, or a local folder/file path")


# ---------------------------------------------------------------------------------------------
# cards for local paths


def _card_from_folder(folder: Path) -> ModelCard:
    from flowgen.engine.transformer.config import NAMED_CONFIGS, Flux2Config

    index = locate.read_json(folder / "model_index.json", what="model_index.json")
    pipeline = index.get("_class_name")
    if pipeline not in _PIPELINE_CLASSES:
        raise CheckpointError(
            f"{folder}: pipeline class {pipeline!r} is not a FLUX.2 [klein] pipeline "
            f"(need one of {', '.join(_PIPELINE_CLASSES)})"
        )
    kv = _PIPELINE_CLASSES[pipeline]
    distilled = True if kv else bool(index.get("is_distilled", False))
    config = Flux2Config.from_diffusers(folder / "transformer")
    from flowgen.engine.catalog.tiny_model import TRANSFORMER as TINY

    architecture = next(
        (n for n in ("klein-9b", "klein-4b") if NAMED_CONFIGS[n] == config), "tiny" if config == TINY else "custom"
    )
    for card in list_cards():  # a local copy of a known model keeps its name, AIR and defaults
        if (card.architecture, card.kv, card.distilled) == (architecture, kv, distilled):
            return card.replace(
                weights=Weights(path=folder),
                tiny=None,
                architecture="custom" if architecture == "tiny" else architecture,
            )
    defaults = Defaults(steps=4 if distilled else 50, cfg_scale=1.0 if distilled else 4.0, width=1024, height=1024)
    return ModelCard(
        name=folder.name,
        description=f"local pipeline folder {folder}",
        architecture=architecture if architecture != "tiny" else "custom",
        kv=kv,
        distilled=distilled,
        defaults=defaults,
        limits=Limits(cfg=not distilled),
        weights=Weights(path=folder),
    )


def _card_from_single_file(file: Path, variant: str | None) -> ModelCard:
    architecture = _single_file_architecture(file)
    if variant is not None:
        card = resolve_model(variant)
        if card.architecture != architecture:
            raise CheckpointError(
                f"{file}: holds a {architecture} transformer, but model {variant!r} is {card.architecture}"
            )
    else:
        matches = [
            c for c in list_cards() if c.weights.single_file and c.weights.single_file.lower() == file.name.lower()
        ]
        if not matches:
            options = ", ".join(c.name for c in list_cards() if c.architecture == architecture)
            raise CheckpointError(
                f"{file}: a {architecture} single file, but its variant ({options}) cannot be "
                "told from its tensors; use BFL's file name or name the card as the variant"
            )
        card = matches[0]
        if card.architecture != architecture:
            raise CheckpointError(f"{file}: named like {card.name} but holds a {architecture} transformer")
    return card.replace(weights=Weights.model_validate({**card.weights.model_dump(), "transformer_file": file}))


def _single_file_architecture(file: Path) -> str:
    """klein-9b or klein-4b, read from the tensor shapes of a BFL single-file transformer."""
    from flowgen.engine.transformer.config import NAMED_CONFIGS
    from flowgen.engine.weights.safetensors_io import open_safetensors

    tensors = open_safetensors(file)
    prefix = _BFL_PREFIX if f"{_BFL_PREFIX}img_in.weight" in tensors else ""
    if f"{prefix}img_in.weight" not in tensors:
        raise CheckpointError(f"{file}: not a BFL FLUX.2 transformer checkpoint (no img_in.weight)")
    if f"{prefix}guidance_in.in_layer.weight" in tensors:
        raise CheckpointError(f"{file}: a FLUX.2 [dev] checkpoint (has guidance_in); flowgen runs [klein] models")
    hidden = tensors.shape(f"{prefix}img_in.weight")[0]
    depth = sum(1 for k in tensors if k.startswith(f"{prefix}double_blocks.") and k.endswith(".img_attn.qkv.weight"))
    single = sum(1 for k in tensors if k.startswith(f"{prefix}single_blocks.") and k.endswith(".linear1.weight"))
    for name in ("klein-9b", "klein-4b"):
        config = NAMED_CONFIGS[name]
        if (hidden, depth, single) == (config.hidden_size, config.depth, config.depth_single_blocks):
            return name
    raise CheckpointError(
        f"{file}: transformer with hidden size {hidden}, {depth} double and {single} single "
        "blocks matches no FLUX.2 [klein] model (9B: 4096/8/24, 4B: 3072/5/20)"
    )


def _check_tiny_sizes(tiny: TinySpec, path: Path) -> None:
    from flowgen.engine.catalog import tiny_model

    actual = tiny_model.sizes()
    if tiny.sizes and tiny.sizes != actual:
        raise CheckpointError(f"{path}: tiny.sizes {tiny.sizes} differ from the embedded model's {actual}")
