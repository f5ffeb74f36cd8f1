"""A job: what the engine needs to render an item's results, read once from its resolved task.

The planner builds one `Job` per item (every result of an item shares it; a result adds its seed;
flowgen.plan.task.ResolvedTask adds what happens to the images after), and regen builds one from a
manifest record. The executor and regen make engine requests from jobs only
(`flowgen.run.engine.BatchRequest.for_jobs`, and the face pass from `Job.face_pass`); the task dict
stays on the item for what is about the task as written: its hash, the record's params, metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any, NamedTuple

DEFAULT_ACCELERATION = "high"  # the spec default (flowgen.engine.sampling.step_cache_settings.PRESETS)

DEFAULT_SCHEDULER = "Default"


class Signature(NamedTuple):
    """What one sampling loop must share: results with equal signatures may share an engine call.

    Step caches decide once per batch, and LoRAs are merged into the weights once per batch (so the
    LoRA set is by content). Reference sets are not part of it: the engine stacks each row's
    references (padded to a length bucket and masked), so items with any references, or none, may
    share a batch. Equal to, and hashed as, the plain tuple of its fields."""

    width: int
    height: int
    steps: int
    guidance: float | None  # CFG scale, None when guidance is off
    scheduler: str  # a spec scheduler name, DEFAULT_SCHEDULER for the model's own
    acceleration: str  # step-cache preset
    accelerator_options: tuple  # acceleratorOptions as sorted (name, value) pairs
    lora_set: tuple  # ((sha256, weight), ...): the LoRAs by content

    def __repr__(self) -> str:
        # shown as the plain tuple it was before it had names (pinned plan outputs print it)
        return tuple.__repr__(self)

    @property
    def label(self) -> str:
        """Human-readable, e.g. '128x128, 4 steps, cfg 3.5' (the scheduler when not Default, the step
        cache when not the default preset, the LoRAs by content): what records and cost estimates key on."""
        parts = [
            f"{self.width}x{self.height}",
            f"{self.steps} steps",
            f"cfg {self.guidance:g}" if self.guidance is not None else "no cfg",
        ]
        if self.scheduler != DEFAULT_SCHEDULER:
            parts.append(self.scheduler)
        if self.acceleration != DEFAULT_ACCELERATION or self.accelerator_options:
            parts.append(
                f"acceleration {self.acceleration}"
                + "".join(f", {name}={value}" for name, value in self.accelerator_options)
            )
        if self.lora_set:
            parts.append("LoRA " + " + ".join(f"{digest[:8]}x{weight:g}" for digest, weight in self.lora_set))
        return ", ".join(parts)


# the spec's ultralytics field -> (FacePass field, type)
_FACE_FIELDS = {
    "confidence": ("confidence", float),
    "inpaintSize": ("inpaint_size", int),
    "maskBlur": ("mask_blur", int),
    "maskPadding": ("mask_padding", int),
    "steps": ("steps", int),
    "strength": ("strength", float),
    "CFGScale": ("guidance", float),
}


class FacePass(NamedTuple):
    """The task's face pass (`ultralytics`): detect faces in the decoded image, re-render each crop.

    Fields the task leaves out are None: the engine's defaults (the spec's) apply
    (flowgen.run.faces.refine_settings makes the engine's settings of it)."""

    positive_prompt: str  # the face prompt, else the task's
    negative_prompt: str  # likewise
    confidence: float | None = None
    inpaint_size: int | None = None
    mask_blur: int | None = None
    mask_padding: int | None = None
    steps: int | None = None
    strength: float | None = None
    guidance: float | None = None  # the face pass's CFGScale

    @classmethod
    def from_task(cls, task: Mapping[str, Any]) -> FacePass | None:
        """The face pass a resolved task asks for, or None."""
        faces = task.get("ultralytics")
        if not isinstance(faces, Mapping):
            return None
        given = {
            name: kind(faces[field]) for field, (name, kind) in _FACE_FIELDS.items() if faces.get(field) is not None
        }
        return cls(
            positive_prompt=str(faces.get("positivePrompt") or task.get("positivePrompt") or ""),
            negative_prompt=str(faces.get("negativePrompt") or task.get("negativePrompt") or ""),
            **given,
        )

    def given(self) -> dict[str, Any]:
        """The fields the task set (the prompts always), by name."""
        return {name: value for name, value in self._asdict().items() if value is not None}


class Job(NamedTuple):
    """The engine-facing parameters of one item (immutable).

    A named tuple rather than a frozen dataclass: a plan builds one per item (100k+ in a big
    plan) and a tuple is several times cheaper to build, with the same immutability."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float | None  # CFG scale when guidance is on, else None (see compile.guidance_for)
    scheduler: str  # a spec scheduler name, DEFAULT_SCHEDULER for the model's own
    references: tuple[str, ...] = ()  # reference image paths, in order
    reference_hashes: tuple[str, ...] = ()  # their sha256 ("unreadable" for a file that could not be read)
    output_format: str = "JPG"  # JPG / PNG / WEBP
    output_quality: int | None = None  # JPG / WEBP quality; None: the encoder's default
    acceleration: str = DEFAULT_ACCELERATION  # step-cache preset
    accelerator_options: tuple = ()  # acceleratorOptions as sorted (name, value) pairs, None values dropped
    loras: tuple = ()  # ((file path, its sha256, weight), ...) in the task's order (compile.resolve_loras)
    face_pass: FacePass | None = None  # the face pass on each decoded image (ultralytics), None without one

    @classmethod
    def from_task(
        cls,
        task: Mapping[str, Any],
        *,
        guidance: float | None,
        references: Sequence[str | PathLike[str]] = (),
        reference_hashes: Sequence[str] = (),
        loras: Sequence[tuple[str, str, float]] = (),
    ) -> Job:
        """The job of a resolved task; `guidance` is decided by the caller (the planner's rule, or
        the value recorded for the batch when replaying); `loras` are the task's LoRA files as resolved
        and hashed by the planner."""
        get = task.get
        quality = get("outputQuality")
        return tuple.__new__(
            cls,
            (  # positional, in field order: the fast path of a big plan
                str(get("positivePrompt", "")),
                str(get("negativePrompt") or ""),
                int(task["width"]),
                int(task["height"]),
                int(task["steps"]),
                guidance,
                str(get("scheduler") or DEFAULT_SCHEDULER),
                tuple(map(str, references)) if references else (),
                tuple(reference_hashes) if reference_hashes else (),
                str(get("outputFormat") or "JPG").upper(),
                None if quality is None else int(quality),
                str(get("acceleration") or DEFAULT_ACCELERATION),
                _options(get("acceleratorOptions")),
                tuple((str(path), str(digest), float(weight)) for path, digest, weight in loras) if loras else (),
                None if get("ultralytics") is None else FacePass.from_task(task),
            ),
        )

    @property
    def signature(self) -> Signature:
        return tuple.__new__(
            Signature,
            (
                self.width,
                self.height,
                self.steps,
                self.guidance,
                self.scheduler,
                self.acceleration,
                self.accelerator_options,
                self.lora_set,
            ),
        )

    @property
    def lora_set(self) -> tuple:
        """The LoRAs by content: ((sha256, weight), ...); equal sets share merged weights."""
        if not self.loras:  # most jobs: no generator to build (batching asks once per result)
            return ()
        return tuple((digest, weight) for _, digest, weight in self.loras)

    @property
    def engine_loras(self) -> list[tuple[str, float]] | None:
        """The LoRAs as the engine takes them: [(path, weight)], None when there are none."""
        return [(path, weight) for path, _, weight in self.loras] or None

    @property
    def accelerator_dict(self) -> dict | None:
        """acceleratorOptions as the engine takes them (None when absent)."""
        return dict(self.accelerator_options) or None

    @property
    def reference_set(self) -> str:
        """Identity of the reference set by content: results sharing it share a pre-pass."""
        return "|".join(self.reference_hashes)

    @property
    def engine_scheduler(self) -> str | None:
        """The scheduler as the engine takes it: None for the model's default."""
        return None if self.scheduler == DEFAULT_SCHEDULER else self.scheduler


def _options(options) -> tuple:
    """acceleratorOptions as a hashable, order-free tuple of (name, value) pairs."""
    if not options:
        return ()
    return tuple(sorted((str(k), v) for k, v in dict(options).items() if v is not None))
