"""The device mesh (runtime/mesh.py, runtime/placement.py, the loop on a mesh in sampling/loop.py).

* `--mesh` text: data=D,model=M, an axis left out fills the devices; everything else is a one-line
  error naming the text and what is allowed;
* the automatic choice: every device on "data" unless the weights do not fit a device;
* on 8 forced CPU devices (subprocesses): the default mesh (data=8) and data=4,model=2 render
  text-to-image, mixed per-row references, a shared reference, CFG (with references), a step cache
  and stochastic / multistep samplers within 45 dB of one device (measured ~87-99 dB, <= 1 level),
  with the step caches deciding alike; the loop's compiled program holds no collective with data=8
  and only per-layer weight all-gathers with model=2 (no activation is ever gathered); loading
  moves nothing between devices (weights go from host memory into their shards).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flowgen.engine.errors import EngineInputError
from flowgen.engine.runtime import RuntimeConfig
from flowgen.engine.runtime.mesh import MeshSpec, choose_model_size
from flowgen.engine.runtime.placement import Placement
from tests.engine.child_python import cpu_env, marked_json, run_python


@pytest.mark.parametrize(
    "text, devices, expected",
    [
        (None, 8, (8, 1)),
        ("", 1, (1, 1)),
        ("data=8", 8, (8, 1)),
        ("data=4", 8, (4, 2)),
        ("model=2", 8, (4, 2)),
        ("data=4,model=2", 8, (4, 2)),
        (" model = 8 ", 8, (1, 8)),
    ],
)
def test_a_mesh_fills_the_devices(text, devices, expected):
    assert MeshSpec.parse(text).resolve(devices) == expected


@pytest.mark.parametrize(
    "text, problem",
    [
        ("model=0", "model must be a whole number of devices >= 1"),
        ("data=-1", "data must be a whole number"),
        ("data=two", "data must be a whole number"),
        ("tensor=2", "unknown axis 'tensor' (allowed: data, model"),
        ("data=2,data=4", "axis data given twice"),
        ("data", "data must be a whole number"),
    ],
)
def test_bad_mesh_text_is_one_line(text, problem):
    with pytest.raises(EngineInputError) as err:
        MeshSpec.parse(text)
    assert str(err.value).startswith(f"mesh {text!r}: ") and problem in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EngineInputError):
        RuntimeConfig(mesh=text)  # refused where the runtime is made, too


@pytest.mark.parametrize(
    "text, problem",
    [
        ("data=3", "data=3 does not divide this machine's 8 devices"),
        ("data=16", "data=16 needs 16 devices; this machine has 8"),
        ("model=9", "model=9 needs 9 devices; this machine has 8"),
        ("data=2,model=2", "data x model = 4 devices, but this machine has 8"),
    ],
)
def test_a_mesh_that_does_not_fit_the_devices_is_one_line(text, problem):
    with pytest.raises(EngineInputError) as err:
        MeshSpec.parse(text).resolve(8)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_the_automatic_model_size_follows_device_memory():
    gb = 1 << 30
    assert choose_model_size(8, 30 * gb, None) == 1  # CPU: memory not checked
    assert choose_model_size(8, 30 * gb, 80 * gb) == 1  # fits replicated
    assert choose_model_size(8, 30 * gb, 28 * gb, sharded_share=0.6) == 2  # 12 + 18/2 <= 0.8 x 28
    assert choose_model_size(8, 30 * gb, 24 * gb, sharded_share=0.6) == 4  # 12 + 18/2 > 19.2 >= 12 + 18/4
    assert choose_model_size(8, 30 * gb, 16 * gb, sharded_share=0.6) == 8  # 12 + 18/8 > 12.8: best effort
    assert choose_model_size(6, 30 * gb, 28 * gb, sharded_share=0.6) == 2
    assert MeshSpec().resolve(8, model_size=2) == (4, 2)


def _placement_over(processes: list[int], data: int, model: int) -> Placement:
    """A Placement over stand-in devices of the given processes (what row ownership reads of a mesh)."""
    devices = np.array([SimpleNamespace(process_index=p) for p in processes], dtype=object).reshape(data, model)
    return Placement(SimpleNamespace(shape={"data": data, "model": model}, devices=devices))


def test_each_process_owns_the_rows_its_devices_compute():
    two = _placement_over([0, 0, 1, 1], 4, 1)  # 2 processes x 2 devices, ordered by process
    assert two.text == "data=4,model=1 over 2 processes" and two.processes == 2
    assert two.row_owners(4) == [0, 0, 1, 1]
    assert two.row_owners(8) == [0, 0, 0, 0, 1, 1, 1, 1]  # contiguous blocks of rows per device
    assert two.row_owners(1) == [0]  # padded to 4 rows: the real one is on device 0
    assert two.row_owners(6) == [0, 0, 0, 0, 1, 1]  # padded to 8: 2 rows per device
    assert _placement_over([0, 0, 1, 1], 2, 2).row_owners(4) == [0, 0, 1, 1]  # a data slice's first device
    one = _placement_over([0] * 4, 4, 1)
    assert one.text == "data=4,model=1" and one.row_owners(4) == [0, 0, 0, 0]


_RENDER = r"""
import json, os, sys, dataclasses
import numpy as np
import jax
from flowgen.engine import Pipeline, RuntimeConfig
from flowgen.engine.sampling import loop

mesh = None if sys.argv[1] == "auto" else sys.argv[1]
loaded_with_no_transfer = True
with jax.transfer_guard_device_to_device("disallow_explicit"):  # weights: host -> their shards only
    pipe = Pipeline.from_pretrained("flux2-klein-tiny", runtime=RuntimeConfig(mesh=mesh), max_sequence_length=24)
source = dataclasses.replace(pipe.source, is_kv=False, distilled=False, defaults={"guidance": 4.0})
base = Pipeline(pipe.transformer, pipe.vae, pipe.prompts.tokenizer, pipe.prompts.encoder, source,
                max_sequence_length=24, placement=pipe.placement)

captured = {}
on_mesh = loop._on_mesh
def spy(placement, params, x, cond, sigmas, prepare_static, steps_static):
    programs = on_mesh(placement, params, x, cond, sigmas, prepare_static, steps_static)
    def steps(*args):
        captured.setdefault("hlo", programs[1].lower(*args).compile().as_text())
        return programs[1](*args)
    return programs[0], steps
loop._on_mesh = spy

def pixels(seed):
    return np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8)

eight = dict(prompts=list("abcdefgh"), seeds=list(range(8)))
cases = {
    "t2i": (pipe, dict(eight, steps=3)),
    "t2i_three_rows": (pipe, dict(prompts=["a", "b", "c"], seeds=[1, 2, 3], steps=3)),
    "mixed_references": (pipe, dict(eight, steps=3, references=[[pixels(1)], [pixels(2), pixels(1)], [], [pixels(3)],
                                                                [pixels(1)], [], [pixels(2)], [pixels(3), pixels(2)]])),
    "shared_reference": (pipe, dict(eight, steps=3, references=[[pixels(1)]] * 8)),
    "cfg": (base, dict(eight, steps=3)),
    "cfg_references": (base, dict(eight, steps=3, references=[[pixels(1)], [pixels(2)], [], [pixels(3)]] * 2)),
    "fbcache": (base, dict(eight, steps=8, acceleration="none",
                           accelerator_options={"fbCache": True, "fbCacheThreshold": 0.3})),
    "multistep": (pipe, dict(eight, steps=5, scheduler="DPMSolverMultistepScheduler")),
    "ancestral": (pipe, dict(eight, steps=4, scheduler="EulerAncestralDiscreteScheduler")),
}
images, decisions = {}, {}
for name, (p, kwargs) in cases.items():
    out = p.generate(**kwargs, width=32, height=48, on_step=lambda done: None)
    images[name] = np.stack(out.images)
    if out.step_caches:
        decisions[name] = [record["computed"] for record in out.step_caches]
np.savez(sys.argv[2], **images)
leaves = jax.tree.leaves(pipe.params)
print("RESULT " + json.dumps({
    "mesh": pipe.mesh_text, "identity_mesh": pipe.identity()["mesh"], "layout": out.layouts[0],
    "decisions": decisions, "hlo": captured.get("hlo", ""),
    "weight_shapes": sorted({str(list(a.shape[1:])) for a in leaves} | {str(list(a.shape)) for a in leaves}),
    "split_leaves": sum(1 for a in leaves if "model" in str(getattr(a.sharding, "spec", ""))),
    "devices_per_leaf": sorted({len(a.sharding.device_set) for a in leaves}),
}))
"""


def _render(tmp_path: Path, mesh: str, devices: int) -> tuple[dict, dict]:
    env = cpu_env(devices, FLOWGEN_CACHE=str(tmp_path / "cache"))
    out = tmp_path / f"{mesh}-{devices}.npz"
    result = marked_json(run_python(_RENDER, mesh, out, env=env, timeout=900).stdout, "RESULT")
    with np.load(out) as images:
        return result, {name: images[name] for name in images.files}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _all_gathers(hlo: str) -> list[str]:
    """The result shapes of every all-gather in an optimised HLO module, as [d0, d1, ...]."""
    import re

    shapes = re.findall(r"= \(?[a-z0-9]+\[([0-9,]*)\][^ ]* all-gather(?:-start)?\(", hlo)
    return ["[" + ", ".join(s.split(",")) + "]" for s in shapes]


@pytest.mark.slow
def test_eight_devices_render_as_one(tmp_path):
    one, one_images = _render(tmp_path, "auto", 1)
    assert one["mesh"] == "data=1,model=1" and one["layout"]["mesh"] == "data=1,model=1"

    data, data_images = _render(tmp_path, "auto", 8)
    assert data["mesh"] == data["identity_mesh"] == data["layout"]["mesh"] == "data=8,model=1"
    assert data["devices_per_leaf"] == [8] and data["split_leaves"] == 0  # replicated on every device
    assert data["hlo"] and _all_gathers(data["hlo"]) == []
    assert not any(op in data["hlo"] for op in ("all-reduce(", "collective-permute(", "all-to-all("))

    fsdp, fsdp_images = _render(tmp_path, "data=4,model=2", 8)
    assert fsdp["mesh"] == "data=4,model=2" and fsdp["split_leaves"] > 0
    gathered = _all_gathers(fsdp["hlo"])
    assert gathered and set(gathered) <= set(fsdp["weight_shapes"]), gathered  # weights only, a layer at a time

    for name, reference in one_images.items():
        for other in (data_images, fsdp_images):
            assert other[name].shape == reference.shape
            assert _psnr(other[name], reference) >= 45, name
            assert np.abs(other[name].astype(int) - reference.astype(int)).max() <= 2, name
    assert data["decisions"] == one["decisions"] == fsdp["decisions"] and one["decisions"]["fbcache"]
