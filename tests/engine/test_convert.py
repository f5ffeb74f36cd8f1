"""`flowgen convert`: released weights -> an Orbax checkpoint in the engine's layout
(weights/orbax_checkpoint.py), restored bit for bit as the safetensors load, straight into the mesh.

* the tiny pipeline (diffusers, float32) and a BFL single file in bfloat16 convert; a restore equals
  `load_transformer` on the safetensors, leaf for leaf and bit for bit, in float32 and bfloat16;
* on 8 forced CPU devices (a subprocess), replicated (data=8) and FSDP (data=4,model=2): the restored
  leaves come back in the very shardings the safetensors load places them in, equal bit for bit,
  without moving anything between devices;
* a converted pipeline folder is a model (`model: OUT`): its images equal the source's;
* a partial or corrupt checkpoint, and an OUT that exists, are one-line errors naming the path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from flowgen.engine import Pipeline, convert_weights, load_transformer, resolve_model
from flowgen.engine.transformer.checkpoint import open_checkpoint
from flowgen.engine.weights import orbax_checkpoint
from flowgen.errors import CheckpointError
from tests.engine.child_python import cpu_env, run_python


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWGEN_CACHE", str(tmp_path_factory.mktemp("flowgen_cache")))
        return resolve_model("flux2-klein-tiny").weights_path()


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny"
    written = convert_weights(tiny, out)
    assert written["pipeline"] and written["dtype"] == "float32" and written["parameters"] > 0
    return out


@pytest.fixture(scope="module")
def bfl_bf16(tiny, tmp_path_factory) -> Path:
    """The tiny transformer as a BFL single file in bfloat16 (how BFL releases their weights)."""
    bfl = open_checkpoint(tiny / "transformer").bfl
    path = tmp_path_factory.mktemp("bfl") / "tiny-bf16.safetensors"
    save_file({k: np.ascontiguousarray(np.asarray(bfl[k]).astype(ml_dtypes.bfloat16)) for k in bfl}, str(path))
    return path


def _assert_same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_restore_equals_the_safetensors_load(tiny, converted, dtype):
    _assert_same_params(
        load_transformer(converted / "transformer", dtype).params, load_transformer(tiny / "transformer", dtype).params
    )
    # a pipeline root holding the converted transformer is read the same way
    _assert_same_params(load_transformer(converted, dtype).params, load_transformer(tiny, dtype).params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_bfl_file_in_bfloat16_converts_and_restores_exactly(bfl_bf16, tmp_path, dtype):
    written = convert_weights(bfl_bf16, tmp_path / "bfl")
    assert not written["pipeline"] and written["dtype"] == "bfloat16" and written["source_layout"] == "bfl"
    _assert_same_params(load_transformer(tmp_path / "bfl", dtype).params, load_transformer(bfl_bf16, dtype).params)


def test_a_converted_pipeline_is_a_model_with_the_same_images(tiny, converted):
    kwargs = dict(prompts=["a red fox", "a boat"], seeds=[1, 2], width=32, height=48, steps=2)
    ours = Pipeline.from_pretrained(str(converted), max_sequence_length=24).generate(**kwargs).images
    source = Pipeline.from_pretrained(str(tiny), max_sequence_length=24).generate(**kwargs).images
    for a, b in zip(ours, source):
        np.testing.assert_array_equal(a, b)


def _one_line_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_transformer(path, "float32")
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_partial_or_corrupt_checkpoints_are_one_line_errors(converted, tmp_path):
    def copy() -> Path:
        target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(converted / "transformer", target)
        return target

    no_metadata = copy()
    (no_metadata / "params" / "_METADATA").unlink()
    assert "missing or incomplete" in _one_line_error(no_metadata)

    bad_marker = copy()
    (bad_marker / orbax_checkpoint.MARKER).write_text("{not json")
    assert "cannot read it" in _one_line_error(bad_marker)

    old_format = copy()
    (old_format / orbax_checkpoint.MARKER).write_text(json.dumps({"format": 99}))
    assert "format 99" in _one_line_error(old_format)

    truncated = copy()  # the largest data file cut short: what a killed copy leaves
    data = max((f for f in (truncated / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    assert "cannot restore the converted weights" in _one_line_error(truncated)

    metadata_lost = copy()
    shutil.rmtree(metadata_lost / "params" / "array_metadatas")
    (metadata_lost / "params" / "_METADATA").write_text("{}")
    assert "cannot read the checkpoint's metadata" in _one_line_error(metadata_lost)

    other_config = copy()  # a checkpoint whose tree does not match its recorded config
    record = json.loads((other_config / orbax_checkpoint.MARKER).read_text())
    record["config"]["num_layers"] = record["config"]["num_layers"] + 1
    (other_config / orbax_checkpoint.MARKER).write_text(json.dumps(record))
    assert "does not match its config" in _one_line_error(other_config)


def test_an_existing_out_is_refused(tiny, converted):
    with pytest.raises(CheckpointError) as err:
        convert_weights(tiny, converted)
    assert str(err.value) == f"{converted}: already exists; give a new folder for the converted weights"


_ON_EIGHT = r"""
import sys
import jax, numpy as np
from flowgen.engine.runtime.placement import Placement
from flowgen.engine import load_transformer

converted, source = sys.argv[1], sys.argv[2]
for data, model in ((8, 1), (4, 2)):
    placement = Placement.build(data, model)
    with placement.loading(), jax.transfer_guard_device_to_device("disallow_explicit"):
        restored = load_transformer(converted, "float32").params
        loaded = load_transformer(source, "float32").params
    split = 0
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(loaded)):
        assert a.sharding == b.sharding, (a.sharding, b.sharding)
        assert len(a.sharding.device_set) == 8
        split += "model" in str(a.sharding.spec)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (split > 0) == (model > 1), split
    print(f"OK data={data},model={model} split={split}")
"""


@pytest.mark.slow
def test_on_eight_devices_a_restore_lands_in_the_mesh_layout(tiny, converted):
    done = run_python(_ON_EIGHT, converted / "transformer", tiny / "transformer", env=cpu_env(8))
    assert "OK data=8,model=1 split=0" in done.stdout and "OK data=4,model=2" in done.stdout
