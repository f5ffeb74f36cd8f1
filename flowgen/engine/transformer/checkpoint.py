"""Load a FLUX.2 [klein] transformer from a diffusers folder or a BFL single file.

Accepted paths: a converted transformer folder (`flowgen convert`, an Orbax checkpoint restored
straight into its layout: weights/orbax_checkpoint.py), a diffusers `transformer/` folder (one file
or shards + index), a pipeline root holding `transformer/`, a single `.safetensors` file in either
layout (BFL files may carry ComfyUI's `model.diffusion_model.` prefix), or a `*.safetensors.index.json`.

Loading streams: tensors are memory-mapped, the diffusers layout is presented to the model as a lazy
BFL-named view (`DiffusersAsBfl`), and the model converts one tensor at a time, so host memory peaks
near one copy of the parameters. Everything a user can get wrong (path, file type, layout, sizes)
is checked before any tensor is read and reported as a one-line CheckpointError.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flowgen.engine.host_memory import release_free_heap
from flowgen.engine.transformer.config import NAMED_CONFIGS, Flux2Config
from flowgen.engine.transformer.keys import (
    DiffusersAsBfl,
    diffusers_shapes,
    rule_for_bfl,
    rule_for_diffusers,
)
from flowgen.engine.weights import orbax_checkpoint
from flowgen.engine.weights.safetensors_io import LazyTensors, open_safetensors
from flowgen.errors import CheckpointError

if TYPE_CHECKING:
    from flowgen.engine.transformer.compiled import CompiledTransformer

COMFY_PREFIX = "model.diffusion_model."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_SHOWN = 5  # how many names an error message lists before "(+N more)"

# Tensors that betray a checkpoint which is not FLUX.2 [klein], with what to tell the user.
_FOREIGN = (
    (
        re.compile(r"(guidance_in|time_guidance_embed\.guidance_embedder)\."),
        "has guidance-embedding weights: this is FLUX.2 [dev], not [klein]",
    ),
    (
        re.compile(r"(double_blocks\.\d+\.img_mod|transformer_blocks\.\d+\.norm1\.linear|vector_in)\."),
        "looks like a FLUX.1 checkpoint, not FLUX.2 [klein]",
    ),
)


@dataclasses.dataclass
class Checkpoint:
    """An opened transformer checkpoint: its tensors in their own names, and as a BFL view."""

    origin: Path  # what error messages name: the file, index or folder the user gave
    tensors: LazyTensors | _Renamed  # native names (prefix already stripped), with .shape(name) and .dtype(name)
    layout: str  # "bfl" or "diffusers"
    config_file: Path | None  # a diffusers config.json found next to the weights

    @functools.cached_property
    def bfl(self) -> LazyTensors | _Renamed | DiffusersAsBfl:
        return self.tensors if self.layout == "bfl" else DiffusersAsBfl(self.tensors)


def load_transformer(
    path: str | Path, dtype: str = "float32", config: Flux2Config | str | dict | Path | None = None
) -> CompiledTransformer:
    """Load a FLUX.2 [klein] transformer; parameters come out in `dtype` whatever the file's dtype.

    `config`: None reads the folder's `config.json`, or infers the sizes from tensor shapes for a
    single file; a name such as "klein-9b"; a `Flux2Config`; or a diffusers config (dict or path).
    Raises CheckpointError (one line, naming the file and tensors) for anything that does not fit.
    """
    from flowgen.engine.transformer.compiled import CompiledTransformer  # the model module is heavy; import on use

    converted = _converted_folder(Path(path))
    if converted is not None:  # `flowgen convert` output: restored straight into its layout
        return orbax_checkpoint.restore_transformer(converted, dtype)
    checkpoint = open_checkpoint(path)
    cfg, cfg_origin = resolve_config(config, checkpoint)
    check_tensors(checkpoint, CompiledTransformer.expected_bfl_shapes(cfg), cfg_origin)
    transformer = CompiledTransformer.from_bfl_tensors(cfg, _GivingBackMemory(checkpoint.bfl), dtype=dtype)
    release_free_heap()
    return transformer


def transformer_config(path: str | Path) -> Flux2Config:
    """The config `load_transformer(path)` builds, read from headers and config files only (no tensor)."""
    converted = _converted_folder(Path(path))
    if converted is not None:
        return orbax_checkpoint.recorded_config(converted)
    return resolve_config(None, open_checkpoint(path))[0]


def _converted_folder(path: Path) -> Path | None:
    """The converted transformer folder `path` is or holds (a pipeline root's transformer/), else None."""
    for folder in (path, path / "transformer"):
        if orbax_checkpoint.is_converted(folder):
            return folder
    return None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Find the weights behind `path`, read their headers and detect the layout (no tensor is read)."""
    weights, config_file = _locate(Path(path))
    lazy = open_safetensors(weights)
    tensors = _strip_prefix(lazy)
    if not tensors:
        raise CheckpointError(f"{weights}: holds no tensors")
    for pattern, problem in _FOREIGN:
        hit = next((k for k in tensors if pattern.match(k)), None)
        if hit:
            raise CheckpointError(f"{weights}: {problem} (found {hit})")
    bfl_hits = sum(rule_for_bfl(k) is not None for k in tensors)
    diffusers_hits = sum(rule_for_diffusers(k) is not None for k in tensors)
    if not bfl_hits and not diffusers_hits:
        found = _names(list(tensors))
        raise CheckpointError(f"{weights}: not a FLUX.2 transformer checkpoint (tensors like {found})")
    layout = "bfl" if bfl_hits >= diffusers_hits else "diffusers"
    return Checkpoint(weights, tensors, layout, config_file if layout == "diffusers" else None)


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weights path for open_safetensors, config.json beside it or None)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        sibling = path.parent / "config.json"
        return path, sibling if path.name.startswith("diffusion_pytorch_model") and sibling.is_file() else None
    if (path / "transformer").is_dir() and not (path / "config.json").is_file():
        path = path / "transformer"  # a diffusers pipeline root
    config_file = path / "config.json" if (path / "config.json").is_file() else None
    for name in (DIFFUSERS_WEIGHTS + ".index.json", DIFFUSERS_WEIGHTS):
        if (path / name).is_file():
            return path / name, config_file
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return path, config_file
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
    hint = f" (found {', '.join(others[:3])}: only .safetensors is supported)" if others else ""
    raise CheckpointError(f"{path}: no transformer weights (*.safetensors) in this folder{hint}")


class _Renamed(Mapping):
    """A view of a LazyTensors under new names (used to drop ComfyUI's prefix)."""

    def __init__(self, source: LazyTensors, names: dict[str, str]):
        self.source, self._names = source, names  # new name -> name in the file

    def __getitem__(self, key: str) -> np.ndarray:
        return self.source[self._names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self._names[key])

    def dtype(self, key: str) -> np.dtype:
        return self.source.dtype(self._names[key])


def _strip_prefix(lazy: LazyTensors) -> LazyTensors | _Renamed:
    """Drop `model.diffusion_model.`; when present, other tensors (VAE, text encoder) are ignored."""
    if not any(k.startswith(COMFY_PREFIX) for k in lazy):
        return lazy
    return _Renamed(lazy, {k[len(COMFY_PREFIX) :]: k for k in lazy if k.startswith(COMFY_PREFIX)})


class _GivingBackMemory(Mapping):
    """Passes tensors through, first handing the previous tensor's freed temporaries back to the OS.

    glibc raises its mmap threshold after large frees, so tensor-sized temporaries (transposes,
    a fused qkv) then come from the heap and their pages stay resident; on a 1 GB checkpoint that
    lifted the load's peak from 1.22x to 1.39x the file size (bench/load_memory.py).
    """

    def __init__(self, source: LazyTensors | _Renamed | DiffusersAsBfl):
        self.source = source

    def __getitem__(self, key: str) -> np.ndarray:
        release_free_heap()
        return self.source[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(key)


def resolve_config(config, checkpoint: Checkpoint) -> tuple[Flux2Config, str]:
    """The config to build, and a few words on where it came from (for error messages)."""
    if isinstance(config, Flux2Config):
        return config, "the given config"
    if isinstance(config, dict):
        return Flux2Config.from_diffusers(config), "the given config dict"
    if isinstance(config, str) and config in NAMED_CONFIGS:
        return Flux2Config.named(config), f"config {config!r}"
    if isinstance(config, (str, Path)):
        if Path(config).exists():
            return Flux2Config.from_diffusers(config), f"config {config}"
        Flux2Config.named(str(config))  # raises, listing the known names
    if config is not None:
        kind = type(config).__name__
        raise CheckpointError(f"config must be a name, a Flux2Config, a dict or a config.json path, not {kind}")
    if checkpoint.config_file is not None:
        return Flux2Config.from_diffusers(checkpoint.config_file), f"{checkpoint.config_file}"
    return infer_config(checkpoint), "the config inferred from tensor shapes"


def infer_config(checkpoint: Checkpoint) -> Flux2Config:
    """Sizes from tensor shapes (BFL names); RoPE axes/theta and eps are not stored, so FLUX.2's are used.

    hidden and in_channels come from `img_in`, the text width from `txt_in`, the head dim from the
    QK-norm scale (it normalises one head), the MLP width from an MLP output projection, and the depths
    from the highest block index (so a gap shows up later as missing tensors).
    """
    bfl = checkpoint.bfl
    shape = bfl.shape

    def first_shape(*keys: str) -> tuple[int, ...]:
        for key in keys:
            if key in bfl:
                return shape(key)
        raise CheckpointError(
            f"{checkpoint.origin}: missing tensor {keys[0]} (needed to infer the config; or pass config=)"
        )

    hidden, in_channels = first_shape("img_in.weight")
    context_in_dim = first_shape("txt_in.weight")[1]
    timestep_dim = first_shape("time_in.in_layer.weight")[1]
    norms = [k for k in bfl if k.endswith(".query_norm.scale")]
    (head_dim,) = first_shape(*(norms or ["double_blocks.0.img_attn.norm.query_norm.scale"]))
    depth = 1 + max((_block_index(k, "double") for k in bfl), default=-1)
    depth_single = 1 + max((_block_index(k, "single") for k in bfl), default=-1)
    if depth_single > 0:
        mlp_hidden = first_shape("single_blocks.0.linear2.weight")[1] - hidden
    else:
        mlp_hidden = first_shape("double_blocks.0.img_mlp.2.weight")[1]
    if head_dim % 4 or hidden % head_dim or int(hidden * (mlp_hidden / hidden)) != mlp_hidden:
        raise CheckpointError(
            f"{checkpoint.origin}: cannot infer a FLUX.2 config (hidden {hidden}, head dim {head_dim}, "
            f"MLP {mlp_hidden}); pass config="
        )
    return Flux2Config(
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        mlp_ratio=mlp_hidden / hidden,
        in_channels=in_channels,
        context_in_dim=context_in_dim,
        axes_dim=(head_dim // 4,) * 4,  # FLUX.2: four equal RoPE axes (t, h, w, l)
        timestep_dim=timestep_dim,
    )


def _block_index(key: str, kind: str) -> int:
    match = re.match(rf"{kind}_blocks\.(\d+)\.", key)
    return int(match.group(1)) if match else -1


def check_tensors(checkpoint: Checkpoint, expected_bfl: Mapping[str, tuple[int, ...]], config_origin: str) -> None:
    """Compare names, shapes and dtypes with what the config needs, in the file's own naming."""
    tensors = checkpoint.tensors
    expected = dict(expected_bfl) if checkpoint.layout == "bfl" else diffusers_shapes(expected_bfl)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    misshaped = [
        f"{k} {_fmt(tensors.shape(k))} (expected {_fmt(expected[k])})"
        for k in expected
        if k in tensors and tuple(tensors.shape(k)) != tuple(expected[k])
    ]
    # ml_dtypes' bfloat16 has kind "V", so reject integer and bool kinds rather than accept only "f"
    not_float = [f"{k} ({tensors.dtype(k)})" for k in expected if k in tensors and tensors.dtype(k).kind in "biu"]
    problems = [
        _listing(f"missing {len(missing)} tensor(s)", missing),
        _listing(f"{len(unexpected)} unexpected tensor(s)", unexpected),
        _listing(f"{len(misshaped)} tensor(s) with the wrong shape", misshaped),
        _listing(f"{len(not_float)} non-float tensor(s)", not_float),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(
            f"{checkpoint.origin}: does not match {config_origin} ({checkpoint.layout} layout): " + "; ".join(problems)
        )


def _listing(label: str, items: list[str]) -> str:
    return f"{label}: {_names(items)}" if items else ""


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
