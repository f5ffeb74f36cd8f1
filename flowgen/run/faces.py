"""The face pass as the engine takes it, and the detector it needs.

The planner reads a task's `ultralytics` field once into its job (flowgen.plan.job.FacePass: its
prompts fall back to the task's); `refine_settings` makes the engine's plain `FaceRefineSettings` of
it, so the engine never sees the task. $FLOWGEN_FACE_DETECTOR, when set, is a YOLOv8 .onnx file
used instead of NudeNet's face classes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from flowgen.engine import FaceRefineSettings
from flowgen.plan.job import FacePass

FACE_DETECTOR_ENV = "FLOWGEN_FACE_DETECTOR"


def detector_path() -> str | None:
    """$FLOWGEN_FACE_DETECTOR (a YOLOv8 .onnx path), or None for NudeNet's detector."""
    return os.environ.get(FACE_DETECTOR_ENV, "").strip() or None


def refine_settings(face_pass: FacePass | None) -> FaceRefineSettings | None:
    """The engine's settings for a job's face pass (spec defaults for what the task left out), or None."""
    if face_pass is None:
        return None
    return FaceRefineSettings(**face_pass.given(), detector=detector_path())


def face_settings(task: Mapping[str, Any]) -> FaceRefineSettings | None:
    """The same for a raw task (a server task, a manifest record's params), read as a plan reads it."""
    return refine_settings(FacePass.from_task(task))


def load_detector() -> None:
    """Load the face detector now (before anything renders): a missing package or a bad
    $FLOWGEN_FACE_DETECTOR is a user error (FaceDetectorUnavailable)."""
    from flowgen.engine import face_detector

    face_detector(detector_path())


def check_detector(tasks: Sequence[Mapping[str, Any]]) -> None:
    """load_detector() when any of these raw tasks asks for the face pass."""
    if any(FacePass.from_task(task) is not None for task in tasks):
        load_detector()
