"""The render path `flowgen run` and `flowgen serve` share: engine call, batch record, per-image finish.

Both turn rows of (job, seed, decoded references) into encoded images the same way, so a served
image is the one a run renders for that job and seed at that batch size and position:

* `render_batch`: one engine call for rows that share a signature, padded with copies of the last
  row up to the batch size (BatchRequest.for_jobs), timed;
* `RenderedBatch.batch_record`: each image's `batch` record (size, position, guidance, signature,
  the engine's reference layout, the merged LoRAs): what regen needs to replay it bit for bit;
* `finish_image`: the face pass (ultralytics), the content check (safety.checkContent), the encode
  with the metadata embedded, and the engine time's cost when the task asks for it.

What is not shared is where things go: the executor (flowgen.run.executor) writes the file into
its folder and records it in the manifest; the server (flowgen.serve.tasks) keeps it in its store
and answers with it. The row order inside a batch is the planner's (flowgen.plan.batching.batch_order).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowgen.engine import MeshPeerLost
from flowgen.plan.job import Job
from flowgen.run.cost import cost_of
from flowgen.run.engine import BatchRequest, Engine
from flowgen.run.faces import refine_settings
from flowgen.run.outputs import encode_image

Row = tuple[Job, int, list]  # (job, seed, decoded references)


@dataclass(frozen=True)
class RenderedBatch:
    """One engine call's images (one per padded slot) and what it took."""

    images: list[np.ndarray]  # HxWx3 uint8
    size: int  # the padded batch size the loop ran at
    seconds: float  # the engine call's wall time
    stages: dict[str, float] = field(default_factory=dict)  # the engine's own stage timings
    layouts: list[dict] = field(default_factory=list)  # per slot: the reference layout the engine chose

    @property
    def seconds_per_image(self) -> float:
        """Each image's share of the engine time (padding slots count: they cost the same)."""
        return self.seconds / self.size

    def batch_record(self, job: Job, position: int) -> dict[str, Any]:
        """The `batch` record of the image at `position` (see module doc)."""
        layout = self.layouts[position] if position < len(self.layouts) else {}
        info = {
            "size": self.size,
            "position": position,
            "guidance": job.guidance,
            "signature": job.signature.label,
            **{k: v for k, v in layout.items() if k != "batch"},
        }
        if job.loras:  # which LoRA files (by content) were merged into the weights
            info["loras"] = [{"path": path, "sha256": digest, "weight": weight} for path, digest, weight in job.loras]
        return info


def render_batch(
    engine: Engine, rows: Sequence[Row], size: int, on_step: Callable[[int], None] | None = None
) -> RenderedBatch:
    """One engine call for `rows` (one signature), padded up to `size`; on_step(steps done) is
    called after every sampling step. Raises what the engine raises, and RuntimeError when it
    returns fewer images than rows."""
    request = BatchRequest.for_jobs(rows, size)
    request.on_step = on_step
    t0 = time.perf_counter()
    output = engine.generate_batch(request)
    seconds = time.perf_counter() - t0
    if len(output.images) < len(rows):
        raise RuntimeError(f"the engine returned {len(output.images)} images for a batch of {len(rows)}")
    return RenderedBatch(
        [np.asarray(image, dtype=np.uint8) for image in output.images],
        len(request.prompts),
        seconds,
        dict(output.timings),
        list(output.layouts),
    )


class FacePassError(RuntimeError):
    """The face pass failed on one image (the message names the engine's error)."""


@dataclass(frozen=True)
class FinishedImage:
    """One image after the finish: its file's bytes and what the record says of it."""

    data: bytes  # the encoded file, metadata embedded
    verdict: Any  # the content check's flowgen.safety.Verdict, None when it did not run
    faces: dict[str, Any] | None  # "faces" (one entry per detection) and "face_detector", when the face pass ran
    timings: dict[str, float]  # seconds, as records keep them: "faces" (when it ran), "check", "encode"
    cost: float | None  # USD of the image's engine time, face pass included; None unless asked for

    @property
    def nsfw(self) -> bool | None:
        return self.verdict.nsfw if self.verdict is not None else None


def finish_image(
    engine: Engine,
    job: Job,
    seed: int,
    pixels: np.ndarray,
    *,
    ext: str,
    metadata: dict[str, Any],
    engine_seconds: float,
    checker: Any = None,
    include_cost: bool = False,
    engine_lock: contextlib.AbstractContextManager | None = None,
) -> FinishedImage:
    """Face pass (job.face_pass), content check (when `checker` is given), encode as `ext` with
    `metadata`, cost of `engine_seconds` (the image's share of its batch) plus the face pass.
    engine_lock: held around the face pass's engine call (the server's engines serve one call at a
    time). Raises FacePassError when the face pass fails."""
    timings: dict[str, float] = {}
    faces = None
    settings = refine_settings(job.face_pass)
    if settings is not None:  # ultralytics: before the check and the encode
        t0 = time.perf_counter()
        try:
            with engine_lock or contextlib.nullcontext():
                refined = engine.refine_faces(pixels, settings, seed, loras=job.engine_loras)
        except MeshPeerLost:  # a process of the mesh is gone: the run ends (flowgen.run.distributed)
            raise
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else ""
            raise FacePassError(f"face refinement error: {type(err).__name__}: {first}") from err
        timings["faces"] = _seconds(t0)
        pixels, faces = refined.image, {"faces": refined.faces, "face_detector": refined.detector}
    t0 = time.perf_counter()
    verdict = checker.check(pixels) if checker is not None else None
    timings["check"] = _seconds(t0)
    t0 = time.perf_counter()
    data = encode_image(pixels, ext, job.output_quality, metadata)
    timings["encode"] = _seconds(t0)
    cost = (
        cost_of(engine_seconds + timings.get("faces", 0.0)) if include_cost else None
    )  # the face pass is engine time too
    return FinishedImage(data, verdict, faces, timings, cost)


def _seconds(start: float) -> float:
    return round(time.perf_counter() - start, 4)
