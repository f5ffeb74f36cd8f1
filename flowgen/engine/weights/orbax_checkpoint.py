"""The transformer in the engine's own layout, as an Orbax checkpoint: converted once, restored fast.

    convert_weights("path/to/FLUX.2-klein-9B", "klein-9b-orbax")   # `flowgen convert WEIGHTS OUT`
    load_transformer("klein-9b-orbax/transformer")                  # restores it (checkpoint.py)

Released weights (a diffusers pipeline or transformer folder, or a BFL single file, in any
supported float dtype) are converted as `load_transformer` converts them — fused, transposed,
stacked (`transformer/params.py`) — and saved with `ocp.StandardCheckpointer` as the
`nnx.to_pure_dict` tree, in the source's dtype (bfloat16 stays bfloat16; float32 and float16 are
kept as float32, losslessly). A restore asks for every leaf as a `jax.ShapeDtypeStruct` with its
dtype (the run's) and its sharding (`runtime/placement.py`: replicated, or split over "model"), so
the arrays come back already in their layout, each process reading only the shards it holds; the
result equals loading the safetensors in that dtype, bit for bit.

A converted transformer is a folder: `flowgen-orbax.json` (format, config, dtype, source),
`config.json` (the diffusers config, so a pipeline folder holding it is still a Klein pipeline to
`resolve_model`) and `params/` (the Orbax checkpoint). Converting a pipeline folder writes a
pipeline folder: the converted `transformer/`, and links to the source's other components (VAE,
text encoder, tokenizer, scheduler, model_index.json), so `model: OUT` works as the source did.
Checkpoints are trusted input (a crafted one can crash the process): convert your own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flowgen.engine.weights.locate import one_line
from flowgen.errors import CheckpointError

if TYPE_CHECKING:
    from flowgen.engine.transformer.compiled import CompiledTransformer

MARKER = "flowgen-orbax.json"
FORMAT = 1
PARAMS = "params"
_STACKED = ("double_blocks", "single_blocks")  # stacked layer modules: their leaves may be split over "model"
_PIPELINE_PARTS = ("model_index.json", "vae", "text_encoder", "tokenizer", "scheduler")


def is_converted(path: str | Path) -> bool:
    """Whether `path` is a converted transformer folder (holds the marker)."""
    return (Path(path) / MARKER).is_file()


def convert_weights(weights: str | Path, out: str | Path, dtype: str | None = None) -> dict[str, Any]:
    """Convert `weights` into `out` (which must not exist); returns what was written (for the CLI).

    dtype: the stored dtype ("float32" or "bfloat16"); None: the source's (see module doc). Raises a
    one-line CheckpointError for weights it cannot read and an `out` it cannot write.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from flowgen.engine.transformer.checkpoint import check_tensors, open_checkpoint, resolve_config
    from flowgen.engine.transformer.compiled import CompiledTransformer, _dtype
    from flowgen.engine.transformer.params import convert_bfl_tensors

    source, out = Path(weights).expanduser(), Path(out).expanduser()
    if out.exists():
        raise CheckpointError(f"{out}: already exists; give a new folder for the converted weights")
    pipeline = source.is_dir() and (source / "model_index.json").is_file()
    checkpoint = open_checkpoint(source)
    config, origin = resolve_config(None, checkpoint)
    check_tensors(checkpoint, CompiledTransformer.expected_bfl_shapes(config), origin)
    stored = dtype or _source_dtype(checkpoint)
    if stored not in ("float32", "bfloat16"):
        raise CheckpointError(
            f"dtype {stored!r} is not supported for a converted checkpoint (allowed: float32, bfloat16)"
        )
    _, abstract = CompiledTransformer._abstract(config, _dtype(stored))
    pure = convert_bfl_tensors(config, checkpoint.bfl, nnx.to_pure_dict(abstract), stored)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as err:
        raise CheckpointError(f"{out}: cannot write there ({err.strerror or err})") from None
    try:
        transformer = staging / "transformer" if pipeline else staging
        transformer.mkdir(exist_ok=True)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((transformer / PARAMS).absolute(), pure)
        checkpointer.wait_until_finished()
        (transformer / "config.json").write_text(json.dumps(config.to_diffusers(), indent=1))
        record = {
            "format": FORMAT,
            "dtype": stored,
            "config": config.to_diffusers(),
            "source": str(source.absolute()),
            "source_layout": checkpoint.layout,
            "parameters": int(sum(np.prod(np.shape(a)) for a in _leaves(pure))),
        }
        (transformer / MARKER).write_text(json.dumps(record, indent=1))
        if pipeline:  # the other components, as links to the source's
            for part in _PIPELINE_PARTS:
                if (source / part).exists():
                    os.symlink((source / part).absolute(), staging / part)
        os.chmod(staging, 0o755)
        os.rename(staging, out)
    except OSError as err:
        raise CheckpointError(f"{out}: cannot write the converted weights ({one_line(err)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**record, "out": str(out), "pipeline": pipeline}


def restore_transformer(path: str | Path, dtype: str) -> CompiledTransformer:
    """The converted transformer at `path`, its weights in `dtype` (norm scales float32), placed on
    the loading mesh if any (`Placement.loading`), else on the default device. One-line
    CheckpointError naming `path` for a missing, corrupt or partial checkpoint."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from flowgen.engine.runtime import placement
    from flowgen.engine.transformer.compiled import CompiledTransformer, _dtype

    path = Path(path)
    config = recorded_config(path)
    graphdef, abstract = CompiledTransformer._abstract(config, _dtype(dtype))
    expected = nnx.to_pure_dict(abstract)
    _check_tree(path, expected)
    loading = placement.loading_placement()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(keys, leaf):
        stacked = keys[0].key in _STACKED
        sharding = device if loading is None else loading.weight_sharding(leaf.shape, leaf.dtype, stacked)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    targets = jax.tree_util.tree_map_with_path(target, expected)
    try:
        pure = ocp.StandardCheckpointer().restore((path / PARAMS).absolute(), targets)
    except Exception as err:  # tensorstore / orbax: a truncated or corrupt data file
        raise CheckpointError(
            f"{path}: cannot restore the converted weights ({one_line(err)[:300]}); "
            "convert them again (flowgen convert)"
        ) from None
    return CompiledTransformer.from_pure(config, graphdef, abstract, pure, dtype)


def recorded_config(path: str | Path):
    """The transformer config a converted folder records (one-line CheckpointError if unreadable)."""
    from flowgen.engine.transformer.config import Flux2Config

    path = Path(path)
    record = _read_marker(path)
    try:
        return Flux2Config.from_diffusers(record["config"])
    except (CheckpointError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / MARKER}: not a flowgen conversion record ({one_line(err)})") from None


def parameter_bytes(path: str | Path, dtype: str) -> int:
    """The converted transformer's size once loaded in `dtype` (from its record; 0 if unreadable)."""
    try:
        return int(_read_marker(Path(path))["parameters"]) * np.dtype(_np_dtype(dtype)).itemsize
    except (CheckpointError, KeyError, TypeError, ValueError):
        return 0


# ---- internals ---------------------------------------------------------------------------------


def _source_dtype(checkpoint) -> str:
    """bfloat16 when every tensor is bfloat16, else float32 (lossless for float16 and float32)."""
    dtypes = {str(checkpoint.tensors.dtype(name)) for name in checkpoint.tensors}
    return "bfloat16" if dtypes == {"bfloat16"} else "float32"


def _np_dtype(dtype: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32


def _leaves(tree) -> list:
    return [leaf for value in tree.values() for leaf in (_leaves(value) if isinstance(value, dict) else [value])]


def _read_marker(path: Path) -> dict[str, Any]:
    marker = path / MARKER
    try:
        record = json.loads(marker.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: not a converted transformer (no {MARKER}; flowgen convert writes one)"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{marker}: cannot read it ({one_line(err)})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(
            f"{marker}: format {record.get('format') if isinstance(record, dict) else None!r} "
            f"is not one this flowgen reads ({FORMAT}); convert the weights again"
        )
    if not (path / PARAMS / "_METADATA").is_file():
        raise CheckpointError(
            f"{path / PARAMS}: the Orbax checkpoint is missing or incomplete (no _METADATA); convert the weights again"
        )
    return record


def _check_tree(path: Path, expected: dict) -> None:
    """The saved tree has exactly the leaves and shapes the config needs (from Orbax's metadata)."""
    import orbax.checkpoint as ocp

    try:
        metadata = ocp.StandardCheckpointer().metadata((path / PARAMS).absolute()).item_metadata.tree
    except Exception as err:
        raise CheckpointError(
            f"{path / PARAMS}: cannot read the checkpoint's metadata ({one_line(err)[:300]})"
        ) from None
    saved = _flat(metadata, lambda leaf: tuple(leaf.shape))
    wanted = _flat(expected, lambda leaf: tuple(leaf.shape))
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    misshaped = sorted(
        f"{k} {saved[k]} (expected {wanted[k]})" for k in set(saved) & set(wanted) if saved[k] != wanted[k]
    )
    problems = [
        f"{label}: {', '.join(items[:5])}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{path / PARAMS}: does not match its config ({'; '.join(problems)}); convert the weights again"
        )


def _flat(tree, value, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, node in tree.items():
        name = f"{prefix}{key}"
        if isinstance(node, dict):
            out.update(_flat(node, value, name + "/"))
        else:
            out[name] = value(node)
    return out
