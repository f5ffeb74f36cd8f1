"""Sampling loops compiled ahead of time (sampling/ahead.py) while the weights load.

In a fresh process with an empty compile cache, `Pipeline.from_pretrained(compile_ahead=[shape])`
compiles the loop for `shape` before it returns; the first `generate` of that shape then compiles
no loop (`_prepare` and `_steps` come from the cache or the process), while a shape that was not
announced still compiles its loop at first use — on one device and on an 8-device mesh.
`flowgen run` announces its batches (PipelineEngine.expect) and records the seconds in `startup`.
"""

from __future__ import annotations

import pytest

from tests.engine.child_python import ROOT, cpu_env, marked_json, run_python

# The head of every child script: `compiled` collects the programs JAX compiles (persistent-cache
# misses), by name, and `picture` makes a reference image.
_MISSES = r"""
import json, logging
compiled = []
class Misses(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if message.startswith("PERSISTENT COMPILATION CACHE MISS for"):
            compiled.append(message.split("'")[1])
logger = logging.getLogger("jax._src.compiler")
logger.setLevel(logging.DEBUG)
logger.addHandler(Misses())

import numpy as np
from PIL import Image

def picture(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
"""

_SCRIPT = _MISSES + r"""

from flowgen.engine import LoopShape, Pipeline

announced = LoopShape(batch=8, width=64, height=64, steps=2)
pipe = Pipeline.from_pretrained("flux2-klein-tiny", compile_ahead=[announced], max_sequence_length=24)
ahead = [name for name in compiled if name in ("jit__prepare", "jit__steps")]
compiled.clear()
pipe.generate(prompts=list("abcdefgh"), seeds=list(range(8)), width=64, height=64, steps=2, on_step=lambda d: None)
first_call = [name for name in compiled if name in ("jit__prepare", "jit__steps")]
compiled.clear()
pipe.generate(prompts=list("abcdefgh"), seeds=list(range(8)), width=64, height=48, steps=2)
unannounced = [name for name in compiled if name in ("jit__prepare", "jit__steps")]
print("RESULT " + json.dumps({"ahead": ahead, "first_call": first_call, "unannounced": unannounced,
                              "seconds": pipe.ahead_seconds, "mesh": pipe.mesh_text}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_an_announced_loop_is_compiled_before_the_first_batch(tmp_path, devices):
    env = cpu_env(devices, drop=("FLOWGEN_COMPILE_CACHE",), FLOWGEN_CACHE=str(tmp_path / "cache"))
    result = marked_json(run_python(_SCRIPT, env=env).stdout, "RESULT")
    assert result["mesh"] == f"data={devices},model=1"
    assert sorted(result["ahead"]) == ["jit__prepare", "jit__steps"] and result["seconds"] > 0
    assert result["first_call"] == []  # nothing of the loop compiled at the first batch
    assert "jit__steps" in result["unannounced"]  # the control: another shape compiles at first use


_RUN = r"""
import json, sys
from flowgen.commands.run import run_command
from flowgen.run.manifest import Manifest
assert run_command(sys.argv[1], sys.argv[2], ["task.width=128", "task.height=128", "task.steps=2"], None, False) == 0
with Manifest(sys.argv[2], create=False) as manifest:
    print("STARTUP " + json.dumps(manifest.runs()[-1]["summary"]["startup"]))
"""


@pytest.mark.slow
def test_a_run_compiles_its_batches_ahead_and_records_it(tmp_path):
    env = cpu_env(drop=("FLOWGEN_COMPILE_CACHE",), FLOWGEN_CACHE=str(tmp_path / "cache"))
    done = run_python(_RUN, ROOT / "recipes" / "quickstart.yaml", tmp_path / "out", env=env)
    startup = marked_json(done.stdout, "STARTUP")
    assert 0 < startup["ahead"] < startup["load"] < startup["first_image"]


_REFERENCES = _MISSES + r"""
from flowgen.engine import LoopShape, Pipeline, ReferenceSet

a, b, c = picture(96, 80, 0), picture(64, 64, 1), picture(112, 128, 2)
set_a, set_bc = ReferenceSet("a", ((96, 80),)), ReferenceSet("b|c", ((64, 64), (112, 128)))  # 30 and 72 tokens
set_d = ReferenceSet("d", ((80, 96),))  # another set of set_a's length: its shared batch runs set_a's loop
shapes = [LoopShape(batch=4, width=64, height=64, steps=2, references=(set_a, set_a, set_bc, None)),
          LoopShape(batch=2, width=64, height=48, steps=2, references=(set_a, set_a)),
          LoopShape(batch=2, width=64, height=48, steps=2, references=(set_d, set_d))]
PROGRAMS = ("jit__prepare", "jit__steps", "jit__prepass_pure", "jit_encode_images", "jit_decode_latents",
            "jit_to_uint8")
pipe = Pipeline.from_pretrained("flux2-klein-tiny", compile_ahead=shapes, max_sequence_length=24)
ahead = sorted(name for name in compiled if name in PROGRAMS)
compiled.clear()
rows = pipe.generate(prompts=list("abcd"), seeds=list(range(4)), width=64, height=64, steps=2,
                     references=[[a], [a], [b, c], []])
shared = pipe.generate(prompts=list("ab"), seeds=[5, 6], width=64, height=48, steps=2, references=[[a], [a]])
first_calls = [name for name in compiled if name in PROGRAMS]
compiled.clear()
pipe.generate(prompts=["e"], seeds=[7], width=64, height=64, steps=2, references=[[picture(112, 64, 3)]])
unannounced = [name for name in compiled if name in PROGRAMS]
print("RESULT " + json.dumps({"ahead": ahead, "first_calls": first_calls, "unannounced": unannounced,
                              "layouts": [rows.layouts[0], shared.layouts[0]], "seconds": pipe.ahead_seconds}))
"""


@pytest.mark.slow
def test_a_batch_with_references_compiles_every_program_before_the_first_batch(tmp_path):
    """Announced with their reference sets (identity and stored sizes, as a plan knows them), a
    per-row batch and a shared one compile their encodes, pre-passes, loops and decodes while the
    weights load, each distinct program once; their first calls compile nothing. A second process
    with the same cache compiles nothing ahead: every program is read back at its first call."""
    env = cpu_env(drop=("FLOWGEN_COMPILE_CACHE",), FLOWGEN_CACHE=str(tmp_path / "cache"))
    result = marked_json(run_python(_REFERENCES, env=env).stdout, "RESULT")
    again = marked_json(run_python(_REFERENCES, env=env).stdout, "RESULT")  # a second process, same cache
    assert [layout["reference_layout"] for layout in result["layouts"]] == ["rows", "shared"]
    # 4 reference sizes, 2 pre-pass lengths (buckets 64 and 80), 2 loops (not 3), 2 output sizes
    assert result["ahead"].count("jit_encode_images") == 4 and result["ahead"].count("jit__prepass_pure") == 2
    assert result["ahead"].count("jit__steps") == 2 and result["ahead"].count("jit_decode_latents") == 2
    assert result["first_calls"] == []
    assert "jit_encode_images" in result["unannounced"]  # the control: a size not announced compiles at first use
    # the cache holds them now: nothing is compiled ahead again (each first call reads its program back)
    assert again["ahead"] == [] and again["seconds"] == 0 and again["first_calls"] == [] and again["unannounced"] == []


_MESH_REFERENCES = _MISSES + r"""
from flowgen.engine import LoopShape, Pipeline, ReferenceSet

a, b = picture(96, 80, 0), picture(64, 64, 1)
set_a, set_b = ReferenceSet("a", ((96, 80),)), ReferenceSet("b", ((64, 64),))
shapes = [LoopShape(batch=8, width=64, height=64, steps=2, references=(set_a,) * 4 + (set_b,) * 4),
          LoopShape(batch=8, width=64, height=64, steps=2, references=(set_a,) * 8)]
LOOPS = ("jit__prepare", "jit__steps")
pipe = Pipeline.from_pretrained("flux2-klein-tiny", compile_ahead=shapes, max_sequence_length=24)
ahead = sorted(name for name in compiled if name in LOOPS)
compiled.clear()
rows = pipe.generate(prompts=list("abcdefgh"), seeds=list(range(8)), width=64, height=64, steps=2,
                     references=[[a]] * 4 + [[b]] * 4)
shared = pipe.generate(prompts=list("abcdefgh"), seeds=list(range(8)), width=64, height=64, steps=2,
                       references=[[a]] * 8)
print("RESULT " + json.dumps({"mesh": pipe.mesh_text, "ahead": ahead,
                              "first_calls": [name for name in compiled if name in LOOPS],
                              "layouts": [rows.layouts[0]["reference_layout"], shared.layouts[0]["reference_layout"]]}))
"""


@pytest.mark.slow
def test_on_a_mesh_the_loops_of_batches_with_references_compile_ahead(tmp_path):
    """On 8 devices the reference inputs of a loop (per-row and shared K/V, key lengths) are split
    over "data" as the call splits them: both loops compile ahead, their first calls compile none."""
    env = cpu_env(8, drop=("FLOWGEN_COMPILE_CACHE",), FLOWGEN_CACHE=str(tmp_path / "cache"))
    result = marked_json(run_python(_MESH_REFERENCES, env=env).stdout, "RESULT")
    assert result["mesh"] == "data=8,model=1" and result["layouts"] == ["rows", "shared"]
    assert result["ahead"] == ["jit__prepare", "jit__prepare", "jit__steps", "jit__steps"]
    assert result["first_calls"] == []


_NEW_SIZE = r"""
width, height = int(sys.argv[1]), int(sys.argv[2])
image, refs = picture(width, height, 0), ReferenceSet(f"{width}x{height}", ((width, height),))
shape = LoopShape(batch=2, width=64, height=64, steps=2, references=(refs, refs))
pipe = Pipeline.from_pretrained("flux2-klein-tiny", compile_ahead=[shape], max_sequence_length=24)
ahead = sorted(compiled)
compiled.clear()
pipe.generate(prompts=list("ab"), seeds=[1, 2], width=64, height=64, steps=2, references=[[image], [image]])
print("RESULT " + json.dumps({"ahead": ahead, "first_calls": compiled}))
"""


@pytest.mark.slow
def test_a_new_reference_size_compiles_ahead_when_everything_else_is_in_the_cache(tmp_path):
    """A second run whose only new program is one reference size's encode (its loop and pre-pass
    are the first run's: same layout, same length bucket) still compiles that encode ahead."""
    env = cpu_env(drop=("FLOWGEN_COMPILE_CACHE",), FLOWGEN_CACHE=str(tmp_path / "cache"))
    script = "import sys\n" + _MISSES + "\nfrom flowgen.engine import LoopShape, Pipeline, ReferenceSet\n" + _NEW_SIZE
    first = marked_json(run_python(script, 96, 80, env=env).stdout, "RESULT")  # 30 tokens: bucket 64
    second = marked_json(run_python(script, 80, 96, env=env).stdout, "RESULT")  # 30 tokens too, another size
    assert first["ahead"].count("jit_encode_images") == 1 and "jit__steps" in first["ahead"]
    assert second["ahead"] == ["jit_encode_images"]  # only the new size; the rest is noted in the cache
    assert "jit_encode_images" not in second["first_calls"]  # (a set's tokens program of the new size is glue)
