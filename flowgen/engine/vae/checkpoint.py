"""Read a FLUX.2 autoencoder checkpoint (diffusers folder or BFL single file) into a JAX params tree.

The tree mirrors diffusers' module paths (see `vae_blocks`); checking is strict: a missing,
unexpected or mis-shaped tensor raises one CheckpointError line that names the file and the
tensors (in the file's own naming), before anything is converted.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from flowgen.engine.runtime import placement
from flowgen.engine.vae import keys as vae_keys
from flowgen.engine.vae.config import VAEConfig
from flowgen.engine.weights.safetensors_io import LazyTensors, open_safetensors
from flowgen.errors import CheckpointError

_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)}
_LIST_LIMIT = 6  # names shown per problem kind; the rest are counted


def resolve_vae_path(path: str | Path) -> Path:
    """A diffusers `vae/` folder, a pipeline root that holds one, or a single safetensors file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such VAE file or folder")
    if path.is_dir() and not any(path.glob("*.safetensors*")) and (path / "vae").is_dir():
        return path / "vae"
    return path


def _weights_in(path: Path) -> Path:
    """In a diffusers folder prefer the default weights, so `*.fp16.safetensors` variants beside
    them are not read as duplicate shards."""
    for name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"):
        if path.is_dir() and (path / name).is_file():
            return path / name
    return path


def read_vae_checkpoint(
    path: str | Path, dtype: jnp.dtype, config: VAEConfig | Mapping | str | Path | None = None
) -> tuple[dict, VAEConfig, Path]:
    """Open, validate and convert. Returns (params, config, resolved path)."""
    path = resolve_vae_path(path)
    tensors = open_safetensors(_weights_in(path))
    file_names = _strip_prefix(set(tensors))
    bfl = vae_keys.looks_like_bfl(set(file_names))
    levels = vae_keys.count_bfl_levels(set(file_names)) if bfl else 0
    # canonical (diffusers) name -> name in the file
    origin = {(vae_keys.bfl_to_diffusers(n, levels) if bfl else n): full for n, full in file_names.items()}
    shapes = {name: _canonical_shape(tensors.shape(full), full) for name, full in origin.items()}

    config = _resolve_config(path, config, shapes)
    expected = vae_keys.diffusers_shapes(config)
    _check_tensors(path, tensors, origin, shapes, expected, levels)

    params: dict = {}
    for name, shape in expected.items():
        array = np.asarray(tensors[origin[name]], dtype=np.float32).reshape(shape)
        _insert(params, name, _to_jax_layout(name, array, dtype))
    return params, config, path


def _strip_prefix(names: set[str]) -> dict[str, str]:
    """file name -> name without a wrapper prefix such as `first_stage_model.` (ComfyUI/LDM files)."""
    if any(n.startswith(("encoder.", "decoder.")) for n in names):
        return {n: n for n in names}
    for prefix in vae_keys.KNOWN_PREFIXES:
        if any(n.startswith(prefix + "encoder.") for n in names):
            return {n[len(prefix) :]: n for n in names if n.startswith(prefix)}
    return {n: n for n in names}


def _canonical_shape(shape: tuple[int, ...], file_name: str) -> tuple[int, ...]:
    if vae_keys.is_bfl_attention_conv(file_name) and len(shape) == 4 and shape[2:] == (1, 1):
        return shape[:2]  # 1x1 conv == Linear
    return tuple(shape)


def _resolve_config(path: Path, config, shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    if isinstance(config, VAEConfig):
        return config
    if config is not None:
        return VAEConfig.from_diffusers(config)
    if path.is_dir() and (path / "config.json").is_file():
        return VAEConfig.from_diffusers(path / "config.json")
    try:
        return vae_keys.infer_config(shapes)
    except KeyError as err:
        raise CheckpointError(f"{path}: not a FLUX.2 autoencoder checkpoint (no tensor {err.args[0]})") from None
    except ValueError as err:
        raise CheckpointError(
            f"{path}: cannot read the VAE architecture from the tensor shapes ({err}); pass a config"
        ) from None


def _check_tensors(
    path: Path,
    tensors: LazyTensors,
    origin: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    bfl_levels: int,
) -> None:
    missing = [n for n in expected if n not in origin]
    if bfl_levels:  # report in the file's own (BFL) naming
        missing = [vae_keys.diffusers_to_bfl(n, bfl_levels) for n in missing]
    unexpected = [origin[n] for n in origin if n not in expected and n not in vae_keys.IGNORED_KEYS]
    bad_shape = [
        f"{origin[n]} {shapes[n]} (expected {expected[n]})"
        for n in expected
        if n in origin and shapes[n] != expected[n]
    ]
    bad_dtype = [
        f"{origin[n]} ({tensors.dtype(origin[n])})"
        for n in expected
        if n in origin and tensors.dtype(origin[n]) not in _FLOAT_DTYPES
    ]
    problems = [
        f"{kind} {_short(items)}"
        for kind, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", bad_shape),
            ("not floating point", bad_dtype),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"{path}: does not match the FLUX.2 VAE architecture: " + "; ".join(problems))


def _short(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f" (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def _to_jax_layout(name: str, array: np.ndarray, dtype: jnp.dtype) -> tuple[str, jnp.ndarray]:
    """PyTorch tensor -> (leaf name, JAX array): conv OIHW -> HWIO, Linear (out, in) -> (in, out)."""
    leaf = name.rsplit(".", 1)[1]
    if name.startswith("bn."):
        return leaf, placement.to_device(array, jnp.float32)  # statistics stay float32
    if leaf == "weight" and array.ndim == 4:
        leaf, array = "kernel", array.transpose(2, 3, 1, 0)
    elif leaf == "weight" and array.ndim == 2:
        leaf, array = "kernel", array.T
    elif leaf == "weight":
        leaf = "scale"
    return leaf, placement.to_device(np.ascontiguousarray(array), dtype)  # on a mesh: replicated, from host


def _insert(tree: dict, name: str, leaf: tuple[str, jnp.ndarray]) -> None:
    node = tree
    for part in name.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[leaf[0]] = leaf[1]
