"""The workflow layer's view of the engine: generate one batch, describe yourself.

`PipelineEngine` adapts flowgen.engine.Pipeline (loaded lazily, once per run, so `plan` never
imports JAX); `FakeEngine` is a deterministic stand-in for fast unit tests whose images are a pure
function of (prompt, negative prompt, seed, reference pixels, size, steps, guidance, dtype, LoRAs).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from flowgen.plan.job import Job


@dataclass
class BatchRequest:
    """One engine call. All lists have one entry per batch slot (padding slots included)."""

    prompts: list[str]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float | None = None
    negative_prompts: list[str] | None = None
    references: list[list[Any]] | None = None  # one list of PIL images per slot, or None
    scheduler: str | None = None  # a spec scheduler name; None: Default
    layout: dict | None = None  # a recorded reference layout to replay (regen), else the engine's choice
    on_step: Callable[[int], None] | None = None  # called with steps done after every sampling step
    acceleration: str | None = None  # step-cache preset (None: the spec default, "high")
    accelerator_options: dict | None = None  # the task's acceleratorOptions
    loras: list[tuple[str, float]] | None = None  # [(LoRA .safetensors path, weight)] for the whole batch
    lora_hashes: tuple[str, ...] = ()  # their sha256 as planned (the fake engine's images depend on them)

    @classmethod
    def for_jobs(
        cls, rows: Sequence[tuple[Job, int, list[Any]]], size: int | None = None, layout: dict | None = None
    ) -> BatchRequest:
        """One engine call for `rows` of (job, seed, decoded references), padded with copies of the
        last row up to `size`, so the compiled program depends only on the batch size (regen
        reproduces it exactly). Every job must share one signature (size, steps, guidance, scheduler)."""
        if not rows:
            raise ValueError("a batch request needs at least one job")
        padded = list(rows) + [rows[-1]] * max(0, (size or len(rows)) - len(rows))
        first = padded[0][0]
        if any(job.signature != first.signature for job, _, _ in padded):
            raise ValueError("the jobs of one engine call must share their signature")
        guidance = first.guidance
        return cls(
            prompts=[job.prompt for job, _, _ in padded],
            seeds=[int(seed) for _, seed, _ in padded],
            width=first.width,
            height=first.height,
            steps=first.steps,
            guidance=guidance,
            negative_prompts=[job.negative_prompt for job, _, _ in padded] if guidance is not None else None,
            references=[refs for _, _, refs in padded] if any(refs for _, _, refs in padded) else None,
            scheduler=first.engine_scheduler,
            layout=layout,
            acceleration=first.acceleration,
            accelerator_options=first.accelerator_dict,
            loras=first.engine_loras,
            lora_hashes=tuple(digest for digest, _ in first.lora_set),
        )


@dataclass
class BatchOutput:
    images: list[np.ndarray]  # HxWx3 uint8, one per slot
    timings: dict[str, float] = field(default_factory=dict)
    layouts: list[dict] = field(default_factory=list)  # per slot: what replays it bit for bit


class Engine(Protocol):
    def generate_batch(self, request: BatchRequest) -> BatchOutput: ...

    def identity(self) -> dict[str, Any]: ...

    def refine_faces(self, pixels: np.ndarray, settings: Any, seed: int, loras: Any = None) -> Any:
        """The face pass on one decoded image (flowgen.run.render.finish_image calls it)."""
        ...


# Loaded pipelines by (model, dtype, mesh as asked): one load per process even across several runs
# (a daemon or a test session running many recipes pays for weights and compilation once).
_LOADED: dict[tuple[str, str, str], Any] = {}

MESH_ENV = "FLOWGEN_MESH"  # the device mesh when none is given: data=D,model=M (flowgen.engine.MeshSpec)


class PipelineEngine:
    """flowgen.engine.Pipeline behind the Engine protocol; weights load on first use.

    mesh: the device mesh, `data=D,model=M` (None: $FLOWGEN_MESH, else the automatic mesh: every
    device on "data"); its syntax is checked here, its fit to the devices by `preflight`."""

    def __init__(self, model: Any, dtype: str = "float32", mesh: str | None = None):
        from flowgen.engine import RuntimeConfig

        self.model = model  # a card, a card name / AIR id, or a pipeline folder
        self.mesh = (mesh if mesh is not None else os.environ.get(MESH_ENV, "")).strip() or None
        self.runtime = RuntimeConfig(dtype=dtype, mesh=self.mesh)  # a resolved dtype: the one the plan hashed
        self.dtype = dtype
        self._pipe = None
        self.load_seconds = 0.0
        self._compiled_before = _compile_stats()  # what this process compiled before this engine
        self._ahead: list = []  # the batch shapes `expect` gave, their programs compiled while the weights load

    @property
    def _key(self) -> tuple[str, str, str]:
        return (str(getattr(self.model, "name", self.model)), self.dtype, self.mesh or "")

    @property
    def pipe(self):
        if self._pipe is None:
            if self._key not in _LOADED:
                from flowgen.engine import Pipeline

                start = time.perf_counter()
                if self._ahead:  # their loops compile while the weights load
                    pipe = Pipeline.from_pretrained(self.model, runtime=self.runtime, compile_ahead=self._ahead)
                else:  # (stand-in loaders in tests take no compile_ahead)
                    pipe = Pipeline.from_pretrained(self.model, runtime=self.runtime)
                _LOADED[self._key] = pipe
                self.load_seconds = time.perf_counter() - start
            self._pipe = _LOADED[self._key]
        return self._pipe

    def expect(self, batches: Sequence[Any]) -> None:
        """The plan batches this engine will render (before it loads): their programs (sampling loop,
        reference pre-passes, VAE encodes and decode) compile ahead of time, in threads, while the
        weights load."""
        if self._pipe is None and self._key not in _LOADED:
            self._ahead = [shape for batch in batches if (shape := _loop_shape(batch)) is not None]

    def startup(self) -> dict[str, Any]:
        """Start-up so far, for the run record: seconds loading the weights, and the programs JAX
        compiled or read back from its persistent cache since this engine was made (with the seconds
        spent tracing, lowering and compiling them)."""
        now, before = _compile_stats(), self._compiled_before
        ahead = getattr(self._pipe, "ahead_seconds", 0.0) if self._pipe is not None else 0.0
        return {
            "load": round(self.load_seconds, 3),
            "ahead": round(ahead, 3),  # of which compiling loops ahead of time, in threads beside the loading
            "compile": round(now.seconds - before.seconds, 3),
            "programs": now.programs - before.programs,
            "cache_hits": now.cache_hits - before.cache_hits,
        }

    def preflight(self) -> None:
        """Raise CheckpointError now if the weights are not on this machine, EngineInputError if the
        mesh does not fit its devices (nothing is loaded)."""
        if self._pipe is None and self._key not in _LOADED:
            from flowgen.engine import resolve_source

            resolve_source(self.model)
            self.batch_multiple()

    def batch_multiple(self) -> int:
        """The mesh's "data" size: batch sizes that are multiples of it give every device whole rows."""
        if self._pipe is not None:
            placement = self._pipe.placement
            return 1 if placement is None else placement.data
        from flowgen.engine import mesh_for

        return mesh_for(self.mesh, self.model, self.dtype)[0]

    def own_rows(self, rows: int) -> list[int]:
        """The rows of a batch of `rows` this process keeps (`Pipeline.own_rows`: all, but on a mesh
        over several processes, those its devices computed)."""
        return self.pipe.own_rows(rows)

    def generate_batch(self, request: BatchRequest) -> BatchOutput:
        kwargs: dict[str, Any] = dict(
            prompts=request.prompts,
            references=request.references,
            width=request.width,
            height=request.height,
            steps=request.steps,
            seeds=request.seeds,
            guidance=request.guidance,
        )
        if request.guidance is not None and request.negative_prompts is not None:
            kwargs["negative_prompts"] = request.negative_prompts
        if request.acceleration is not None or request.accelerator_options:
            kwargs.update(acceleration=request.acceleration, accelerator_options=request.accelerator_options)
        if request.loras:
            kwargs["loras"] = request.loras
        out = self.pipe.generate(**kwargs, scheduler=request.scheduler, layout=request.layout, on_step=request.on_step)
        if request.loras and request.lora_hashes:
            _check_lora_hashes(request, self.pipe.loras.key)
        return BatchOutput(
            [np.asarray(image, dtype=np.uint8) for image in out.images], dict(out.timings or {}), list(out.layouts)
        )

    def identity(self) -> dict[str, Any]:
        return dict(self.pipe.identity())

    def refine_faces(self, pixels: np.ndarray, settings, seed: int, loras=None):
        """The face pass on one decoded image (flowgen.engine.faces.refine); a FaceRefineResult."""
        from flowgen.engine import refine_faces

        return refine_faces(self.pipe, pixels, settings, seed, loras=loras)


def _loop_shape(batch) -> Any:
    """The `flowgen.engine.LoopShape` of a plan batch: its size and signature, and each row's
    reference set as planned (the rows past its results repeat the last, as `BatchRequest.for_jobs` pads)."""
    from flowgen.engine import LoopShape, ReferenceSet

    items = [result.item for result in batch.results]
    if not items:
        return None
    rows = [ReferenceSet(item.job.reference_set, item.reference_sizes) if item.references else None for item in items]
    rows += rows[-1:] * (batch.size - len(rows))
    first, signature = items[0].job, batch.signature
    return LoopShape(
        batch=batch.size,
        width=signature.width,
        height=signature.height,
        steps=signature.steps,
        guidance=signature.guidance,
        scheduler=first.engine_scheduler,
        acceleration=first.acceleration,
        accelerator_options=tuple(sorted((first.accelerator_dict or {}).items())),
        references=tuple(rows) if any(rows) else (),
    )


def _compile_stats():
    from flowgen.engine import compile_stats

    return compile_stats()


def _check_lora_hashes(request: BatchRequest, merged: tuple) -> None:
    """The LoRA files the engine merged are the ones the plan hashed (else the images would be
    recorded under another content hash)."""
    from flowgen.errors import CheckpointError

    loras = request.loras or []
    planned = [(path, digest) for (path, weight), digest in zip(loras, request.lora_hashes) if weight != 0]
    for (path, digest), (now, _) in zip(planned, merged):  # the engine drops weight-0 LoRAs too
        if now != digest:
            raise CheckpointError(f"LoRA {path} changed since the plan; plan again")


class FakeEngine:
    """Deterministic images from a hash of everything that should change them; counts its calls."""

    def __init__(self, delay_per_image: float = 0.0, dtype: str = "float32"):
        self.calls: list[BatchRequest] = []
        self.face_calls: list[tuple] = []  # (FaceRefineSettings, seed) per refine_faces call
        self.delay_per_image = delay_per_image
        self.dtype = dtype

    def generate_batch(self, request: BatchRequest) -> BatchOutput:
        self.calls.append(request)
        start = time.perf_counter()
        images = [self._image(request, slot) for slot in range(len(request.prompts))]
        if self.delay_per_image:
            time.sleep(self.delay_per_image * len(images))
        for step in range(1, request.steps + 1):
            if request.on_step is not None:
                request.on_step(step)
        layout = {
            "reference_layout": "rows" if request.references else "none",
            "reference_length": 0,
            "batch": len(images),
        }
        return BatchOutput(images, {"fake": time.perf_counter() - start}, [layout] * len(images))

    def identity(self) -> dict[str, Any]:
        return {"engine": "fake", "version": 1, "dtype": self.dtype, "device_kind": "cpu"}

    def refine_faces(self, pixels: np.ndarray, settings, seed: int, loras=None):
        """A stand-in face pass: an 8x8 corner "face" recoloured from (settings, seed), so changing
        either changes the file as the real pass would."""
        from flowgen.engine import FaceRefineResult

        self.face_calls.append((settings, seed))
        out = np.array(pixels, dtype=np.uint8, copy=True)
        out[:8, :8] = np.frombuffer(hashlib.sha256(repr((settings, seed)).encode()).digest()[:3], np.uint8)
        return FaceRefineResult(
            out,
            [{"label": "fake", "score": 1.0, "box": [0, 0, 8, 8], "refined": True, "region": [0, 0, 8, 8]}],
            detector={"detector": "fake"},
        )

    def _image(self, request: BatchRequest, slot: int) -> np.ndarray:
        digest = hashlib.sha256()
        negative = request.negative_prompts[slot] if request.negative_prompts and request.guidance else ""
        scheduler = None if request.scheduler in (None, "Default") else request.scheduler
        digest.update(
            repr(
                (
                    request.prompts[slot],
                    negative,
                    request.seeds[slot],
                    request.width,
                    request.height,
                    request.steps,
                    request.guidance,
                )
                + ((scheduler,) if scheduler else ())
                + ((self.dtype,) if self.dtype != "float32" else ())
            ).encode()
        )  # float32 images as before the dtype setting
        if request.loras:  # LoRAs by content and weight, as the real engine's merged weights
            digest.update(repr([(h, w) for h, (_, w) in zip(request.lora_hashes, request.loras)]).encode())
        for ref in (request.references[slot] if request.references else None) or []:
            digest.update(np.asarray(ref).tobytes())
        rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "big"))
        # smooth noise (a coarse grid upsampled) compresses like a picture, not like static
        coarse = rng.integers(0, 256, size=(request.height // 8 + 1, request.width // 8 + 1, 3), dtype=np.uint8)
        return np.repeat(np.repeat(coarse, 8, 0), 8, 1)[: request.height, : request.width].copy()
