"""The engine's capabilities() is what the recipe layer's support table reads (nothing hard-coded)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import MappingProxyType

from flowgen.engine.capabilities import Capabilities, capabilities
from flowgen.engine.sampling import names
from flowgen.recipe import validation


def test_capabilities_are_jax_free_and_say_what_the_engine_does():
    code = ("import sys; from flowgen.engine.capabilities import capabilities; capabilities(); "
            "import flowgen.engine.cards, flowgen.recipe.api; assert 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    caps = capabilities()
    assert isinstance(caps, Capabilities) and capabilities() is caps
    assert caps.schedulers == names.SUPPORTED and dict(caps.refused_schedulers) == names.REFUSED
    assert caps.acceleration == ("high",) and caps.dtypes == ("float32", "bfloat16")
    assert (caps.lora, caps.accelerator_options, caps.ultralytics) == (False, False, False)
    assert caps.max_references == 4 and caps.reference_inputs == ("file",)


def test_support_problems_follow_the_capabilities(monkeypatch):
    task = {"lora": [{"model": "civitai:1@1"}], "ultralytics": {}, "acceleratorOptions": {}, "acceleration": "low",
            "scheduler": "DPM++ 2M", "inputs": {"referenceImages": ["https://example.com/a.png", "a.png"]}}
    today = validation.support_problems(task, "task")
    assert today == [
        "task.acceleration: not supported yet by the local engine (only 'high', the default: the exact reference KV "
        "cache is always on); remove it",
        "task.acceleratorOptions: not supported yet by the local engine (no step caching besides the exact reference KV "
        "cache); remove it",
        "task.lora: not supported yet by the local engine (LoRA adapters are not loaded); remove it",
        "task.ultralytics: not supported yet by the local engine (no face refinement pass); remove it",
        "task.inputs.referenceImages[0]: not supported yet by the local engine (reference images must be local files, "
        "not URLs, data URIs or UUIDs); remove it",
    ]
    more = dataclasses.replace(capabilities(), lora=True, ultralytics=True, accelerator_options=True,
                               acceleration=("low", "high"), reference_inputs=("file", "url"),
                               refused_schedulers=MappingProxyType({"DPM++ 2M": "not today"}))
    monkeypatch.setattr(validation, "capabilities", lambda: more)
    assert validation.support_problems(task, "task") == [
        "task.scheduler: not supported yet by the local engine (not today); remove it"]
