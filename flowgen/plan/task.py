"""A resolved task, read once: the job the engine renders, and what happens to its images after.

The recipe layer (and the server's validation) resolve a task into a plain dict of spec fields.
`ResolvedTask.from_task` is where the workflow reads that dict by field name (with
`Job.from_task`, which it calls): the planner keeps its parts on each item (PlannedItem.job,
.delivery, .number_results) and a server on each task. Engine requests and the face pass are
built from the Job (flowgen.run.engine.BatchRequest.for_jobs), records and deliveries from the
Delivery. The dict itself stays on the item for what is about the task as written: its content
hash, the record's params, the embedded metadata.

    resolved = ResolvedTask.from_task(task, guidance=guidance_for(task, distilled),
                                      references=paths, reference_hashes=hashes, loras=loras)
    resolved.job.signature, resolved.delivery.webhook_url, resolved.number_results, resolved.seed
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any, NamedTuple

from flowgen.plan.job import Job

DEFAULT_OUTPUT_TYPE = "URL"  # the spec default


class Delivery(NamedTuple):
    """Where an item's images go and what is sent or recorded with them; none of it changes a pixel
    (flowgen.plan.hashing.NON_IMAGE_FIELDS)."""

    task_uuid: str | None = None  # the task's taskUUID; None: records derive one from the item
    output_type: str = DEFAULT_OUTPUT_TYPE  # URL / base64Data / dataURI: how an answer or webhook carries the image
    upload_endpoint: str | None = None  # a presigned PUT target
    webhook_url: str | None = None
    method: str = "sync"  # deliveryMethod; "async": `flowgen run` runs in the background
    include_cost: bool = False  # the engine time's cost goes with each result
    check_content: bool = False  # safety.checkContent: the content check runs, flagged images are withheld
    ttl: int | None = None  # seconds the image is kept (`flowgen gc`, the server's store)

    @classmethod
    def from_task(cls, task: Mapping[str, Any]) -> Delivery:
        if _DELIVERY_FIELDS.isdisjoint(task):  # the usual task (a plan may hold 100k+): the defaults
            return NO_DELIVERY
        get = task.get
        return tuple.__new__(
            cls,
            (  # positional, in field order: one per item of a big plan
                _text(get("taskUUID")),
                str(get("outputType") or DEFAULT_OUTPUT_TYPE),
                _text(get("uploadEndpoint")),
                _text(get("webhookURL")),
                str(get("deliveryMethod") or "sync"),
                get("includeCost") is True,
                (get("safety") or {}).get("checkContent") is True,
                get("ttl"),  # validated as an integer where the task was resolved
            ),
        )


_DELIVERY_FIELDS = frozenset(
    {"taskUUID", "outputType", "uploadEndpoint", "webhookURL", "deliveryMethod", "includeCost", "safety", "ttl"}
)
NO_DELIVERY = Delivery()  # a task that names none of the delivery fields


class ResolvedTask(NamedTuple):
    """A resolved task as the workflow uses it (see the module doc)."""

    job: Job  # what the engine renders (every result of the task; a result adds its seed)
    delivery: Delivery
    number_results: int = 1
    seed: int | None = None  # the task's fixed seed (result i uses seed + i); None: derived per result

    @classmethod
    def from_task(
        cls,
        task: Mapping[str, Any],
        *,
        guidance: float | None,
        references: Sequence[str | PathLike[str]] = (),
        reference_hashes: Sequence[str] = (),
        loras: Sequence[tuple[str, str, float]] = (),
    ) -> ResolvedTask:
        """`guidance`, the references' content hashes and the LoRA files are decided by the caller
        (see Job.from_task)."""
        seed = task.get("seed")
        return tuple.__new__(
            cls,
            (
                Job.from_task(
                    task, guidance=guidance, references=references, reference_hashes=reference_hashes, loras=loras
                ),
                Delivery.from_task(task),
                number_results(task),
                None if seed is None else int(seed),
            ),
        )


def number_results(task: Mapping[str, Any]) -> int:
    """How many images the task asks for (the spec default 1)."""
    return int(task.get("numberResults") or 1)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
