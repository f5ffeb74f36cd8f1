"""A task's `ultralytics` field as the engine's face refinement settings, and the detector it needs.

The run layer reads the task (its prompts are the fallback for the face prompts) and hands the
engine a plain `FaceRefineSettings`; the engine never sees the task. $FLOWGEN_FACE_DETECTOR, when
set, is a YOLOv8 .onnx file used instead of NudeNet's face classes.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from flowgen.engine.face_refine import FaceRefineSettings

FACE_DETECTOR_ENV = "FLOWGEN_FACE_DETECTOR"

# spec field -> (settings field, type)
_FIELDS = {
    "confidence": ("confidence", float),
    "inpaintSize": ("inpaint_size", int),
    "maskBlur": ("mask_blur", int),
    "maskPadding": ("mask_padding", int),
    "steps": ("steps", int),
    "strength": ("strength", float),
    "CFGScale": ("guidance", float),
}


def detector_path() -> str | None:
    """$FLOWGEN_FACE_DETECTOR (a YOLOv8 .onnx path), or None for NudeNet's detector."""
    return os.environ.get(FACE_DETECTOR_ENV, "").strip() or None


def face_settings(task: Mapping[str, Any]) -> FaceRefineSettings | None:
    """The face pass a resolved task asks for (`ultralytics`, spec defaults for what it leaves out),
    or None. Its prompts fall back to the task's."""
    faces = task.get("ultralytics")
    if not isinstance(faces, Mapping):
        return None
    values = {name: kind(faces[field]) for field, (name, kind) in _FIELDS.items() if faces.get(field) is not None}
    return FaceRefineSettings(
        positive_prompt=str(faces.get("positivePrompt") or task.get("positivePrompt") or ""),
        negative_prompt=str(faces.get("negativePrompt") or task.get("negativePrompt") or ""),
        detector=detector_path(),
        **values,
    )


def check_detector(tasks: Sequence[Mapping[str, Any]]) -> None:
    """Load the face detector now when any task asks for the face pass: a missing package or a bad
    $FLOWGEN_FACE_DETECTOR is a user error before anything renders (FaceDetectorUnavailable)."""
    if any(isinstance(task.get("ultralytics"), Mapping) for task in tasks):
        from flowgen.engine.face_detect import face_detector

        face_detector(detector_path())
