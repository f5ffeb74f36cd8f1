"""The engine's capabilities() is what the recipe layer's support table reads (nothing hard-coded)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import MappingProxyType

import numpy as np
from safetensors.numpy import save_file

from flowgen.engine.catalog.capabilities import Capabilities, capabilities
from flowgen.engine.sampling import names
from flowgen.recipe import validation


def test_capabilities_are_jax_free_and_say_what_the_engine_does():
    code = ("import sys; from flowgen.engine.catalog.capabilities import capabilities; capabilities(); "
            "import flowgen.engine.catalog.cards, flowgen.recipe.api; assert 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    caps = capabilities()
    assert isinstance(caps, Capabilities) and capabilities() is caps
    assert caps.schedulers == names.SUPPORTED and dict(caps.refused_schedulers) == names.REFUSED
    assert caps.acceleration == ("none", "low", "medium", "high") and caps.dtypes == ("float32", "bfloat16")
    assert caps.accelerator_options is True  # step caches
    assert caps.lora is True  # LoRAs merged per batch
    assert caps.ultralytics is True  # the face pass (flowgen.engine.faces.refine)
    assert caps.max_references == 4 and caps.reference_inputs == ("file",)


def test_support_problems_follow_the_capabilities(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWGEN_LORA_DIR", str(tmp_path))
    save_file({"transformer.x_embedder.lora_A.weight": np.zeros((1, 128), np.float32),  # civitai:1@1 resolves to it
               "transformer.x_embedder.lora_B.weight": np.zeros((64, 1), np.float32)},
              str(tmp_path / "civitai_1_1.safetensors"))
    task = {"lora": [{"model": "civitai:1@1"}], "ultralytics": {}, "acceleratorOptions": {}, "acceleration": "low",
            "scheduler": "DPM++ 2M", "inputs": {"referenceImages": ["https://example.com/a.png", "a.png"]}}
    today = validation.support_problems(task, "task")
    assert today == [  # acceleration "low", acceleratorOptions (step caches), lora and ultralytics are honoured
        "task.inputs.referenceImages[0]: not supported yet by the local engine (reference images must be local files, "
        "not URLs, data URIs or UUIDs); remove it",
    ]
    more = dataclasses.replace(capabilities(), lora=True, ultralytics=True, accelerator_options=True,
                               acceleration=("low", "high"), reference_inputs=("file", "url"),
                               refused_schedulers=MappingProxyType({"DPM++ 2M": "not today"}))
    monkeypatch.setattr(validation, "capabilities", lambda: more)
    assert validation.support_problems(task, "task") == [
        "task.scheduler: not supported yet by the local engine (not today); remove it"]
