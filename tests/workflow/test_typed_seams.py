"""Typed seams between the plan and the run (issue 19 item 5): a named Signature, typed Plan
fields instead of a free-form dict, a typed resolved task, and execute() taking one RunPlan."""

from __future__ import annotations

from flowgen.plan.job import Job, Signature


def test_a_signature_is_named_and_still_equal_hashed_and_printed_as_its_plain_tuple():
    job = Job.from_task({"positivePrompt": "p", "width": 128, "height": 64, "steps": 6, "scheduler": "DPM++ 2M",
                         "acceleration": "low", "acceleratorOptions": {"cacheEndStep": 4}}, guidance=3.5,
                        loras=[("/l/a.safetensors", "ab" * 32, 0.5)])
    signature = job.signature
    plain = (128, 64, 6, 3.5, "DPM++ 2M", "low", (("cacheEndStep", 4),), (("ab" * 32, 0.5),))
    assert isinstance(signature, Signature)
    assert (signature.width, signature.height, signature.steps, signature.guidance) == (128, 64, 6, 3.5)
    assert (signature.scheduler, signature.acceleration) == ("DPM++ 2M", "low")
    assert signature.accelerator_options == (("cacheEndStep", 4),) and signature.lora_set == (("ab" * 32, 0.5),)
    # what batches group by, serve keys its queues on and pinned plan outputs print: unchanged
    assert signature == plain and hash(signature) == hash(plain) and repr(signature) == repr(plain)
    assert str(signature) == str(plain) and f"{signature}" == f"{plain}"
    assert signature.label == "128x64, 6 steps, cfg 3.5, DPM++ 2M, acceleration low, cacheEndStep=4, LoRA ababababx0.5"


def test_a_default_signature_labels_as_before():
    job = Job.from_task({"positivePrompt": "p", "width": 256, "height": 256, "steps": 4}, guidance=None)
    assert job.signature.label == "256x256, 4 steps, no cfg"
    assert job.signature.guidance is None and job.signature.lora_set == ()
