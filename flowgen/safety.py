"""Content safety check for `safety.checkContent` (result field `NSFWContent`).

The checker runs NudeNet's detector (nudenet >= 3.4: a small YOLOv8 ONNX model, `320n.onnx`, shipped
inside the nudenet wheel) on onnxruntime's CPU provider. Nothing is downloaded at run time.

    checker = ContentChecker()               # cheap; the model loads on first use (or .load())
    verdict = checker.check(pixels)          # pixels: (H, W, 3) uint8 RGB
    verdict.nsfw                             # -> the image's NSFWContent
    verdict.as_record()                      # -> dict for the manifest

What counts as NSFW
-------------------
NudeNet detects 18 body-part classes (NUDENET_LABELS). An image is flagged when any class in
EXPLICIT_LABELS scores >= threshold (default 0.5):

    FEMALE_BREAST_EXPOSED, FEMALE_GENITALIA_EXPOSED, MALE_GENITALIA_EXPOSED,
    BUTTOCKS_EXPOSED, ANUS_EXPOSED

These are the classes that mean explicit nudity. Left out on purpose:
  * MALE_BREAST_EXPOSED, BELLY_EXPOSED, ARMPITS_EXPOSED, FEET_EXPOSED: ordinary in swimwear, sports
    and beach pictures; flagging them would mark most pictures of people in summer clothes;
  * every *_COVERED class and FACE_FEMALE / FACE_MALE: clothed or not a nudity signal at all.
Pass `labels=` to ContentChecker for a different policy.

Scores: NudeNet's post-processing drops boxes under 0.2 and its NMS drops scores under 0.25, so a
threshold below 0.25 behaves like 0.25. Like any detector it has false positives: skimage's
`colorwheel` test chart (a saturated hue disc) scores BUTTOCKS_EXPOSED 0.83.

Colour order: NudeNet reads files with cv2 (BGR). Its `_read_image` then applies
cvtColor(RGBA2BGR) (which on 3 channels swaps R and B) and blobFromImage(swapRB=True) (which swaps
them back), so the network sees the file's channels in BGR order. `check()` takes RGB, as the rest
of flowgen does, and hands NudeNet the BGR array it would have read from the same image saved to a
file, so results equal `NudeDetector().detect("image.png")` exactly.

Threads: the detector is loaded once per process behind a lock and shared by every ContentChecker;
onnxruntime sessions may be run from several threads at once.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowgen.errors import FlowgenError

INSTALL_HINT = "safety.checkContent needs NudeNet: pip install 'flowgen[safety]'"

# nudenet 3.4's class list, in model output order (nudenet.nudenet.__labels).
NUDENET_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

# The classes that make an image NSFW (see the module docstring for why these).
EXPLICIT_LABELS: frozenset[str] = frozenset(
    {
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)

DEFAULT_THRESHOLD = 0.5
_BATCH_SIZE = 8  # images per onnxruntime call in check_many


class SafetyUnavailable(FlowgenError):
    """The content checker cannot run: NudeNet/onnxruntime missing, or its model failed to load."""

    def __init__(self, message: str = INSTALL_HINT):
        super().__init__(" ".join(str(message).split()))  # always one line


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check.

    nsfw: the image's NSFWContent.
    detections: every (label, score) NudeNet reported, highest score first.
    threshold: the score at or above which a flagged label counts.
    flagged: the labels that made it NSFW (empty when nsfw is False).
    """

    nsfw: bool
    detections: tuple[tuple[str, float], ...]
    threshold: float
    flagged: tuple[str, ...] = field(default=())

    def as_record(self) -> dict[str, Any]:
        return {
            "NSFWContent": self.nsfw,
            "threshold": self.threshold,
            "flagged": list(self.flagged),
            "detections": [{"label": label, "score": round(score, 4)} for label, score in self.detections],
        }


def available() -> bool:
    """Whether nudenet and onnxruntime are installed (nothing is imported or loaded)."""
    return all(importlib.util.find_spec(name) is not None for name in ("nudenet", "onnxruntime"))


# ---- the shared detector ---------------------------------------------------------------------

_DETECTOR: Any = None
_LOCK = threading.Lock()


def _load_detector() -> Any:
    """Build nudenet's NudeDetector on onnxruntime's CPU provider. Raises SafetyUnavailable."""
    try:
        import onnxruntime
        from nudenet import NudeDetector
    except ImportError as exc:  # nudenet, onnxruntime, or nudenet's cv2 missing
        raise SafetyUnavailable() from exc

    try:
        try:
            detector = NudeDetector()
        except ValueError:
            # Older onnxruntime-gpu builds refuse a session without explicit providers, and
            # nudenet 3.4 ignores its own `providers` argument: set up the attributes that
            # NudeDetector.__init__ sets, around a CPU session (below).
            detector = NudeDetector.__new__(NudeDetector)
            detector.onnx_session = None
            detector.input_width = detector.input_height = 320
        # Keep it on the CPU: the model is tiny and the accelerator belongs to the generator.
        session = detector.onnx_session
        if session is None or session.get_providers() != ["CPUExecutionProvider"]:
            session = onnxruntime.InferenceSession(detector_model_path(), providers=["CPUExecutionProvider"])
            detector.onnx_session = session
            detector.input_name = session.get_inputs()[0].name
    except SafetyUnavailable:
        raise
    except Exception as exc:
        raise SafetyUnavailable(
            f"safety.checkContent: NudeNet's detector failed to load ({type(exc).__name__}: {exc})"
        ) from exc
    return detector


def detector_model_path() -> str:
    import os

    import nudenet.nudenet

    return os.path.join(os.path.dirname(nudenet.nudenet.__file__), "320n.onnx")


def _detector() -> Any:
    global _DETECTOR
    detector = _DETECTOR
    if detector is None:
        with _LOCK:
            detector = _DETECTOR
            if detector is None:
                detector = _DETECTOR = _load_detector()
    return detector


def shared_detector() -> Any:
    """The process's one NudeNet detector (the face refinement pass uses its face classes too).
    Raises SafetyUnavailable."""
    return _detector()


# ---- the checker -----------------------------------------------------------------------------


class ContentChecker:
    """Flags images in which an explicit NudeNet class scores >= threshold.

    threshold: in [0, 1]; default 0.5.
    labels: the classes that count (default EXPLICIT_LABELS); each must be one of NUDENET_LABELS.
    Construction is cheap; the model loads on the first check (or on .load()), once per process.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, labels: Iterable[str] | None = None):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a number in [0, 1], got {threshold!r}")
        threshold = float(threshold)
        if math.isnan(threshold) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        chosen = frozenset(EXPLICIT_LABELS if labels is None else labels)
        unknown = sorted(chosen - set(NUDENET_LABELS))
        if unknown:
            raise ValueError(f"unknown NudeNet labels {unknown}; known: {', '.join(NUDENET_LABELS)}")
        self.threshold = threshold
        self.labels = chosen

    def load(self) -> ContentChecker:
        """Load the detector now (e.g. before generating), raising SafetyUnavailable if it can't."""
        _detector()
        return self

    def check(self, pixels: Any) -> Verdict:
        """Check one (H, W, 3) uint8 RGB image ((H, W, 4) RGBA is accepted; alpha is ignored)."""
        return self._verdict(_detector().detect(to_bgr(pixels)))

    def check_many(self, images: Sequence[Any]) -> list[Verdict]:
        """Check several images in batched onnxruntime calls; one Verdict per image, in order."""
        if not images:
            return []
        bgr = [to_bgr(pixels) for pixels in images]
        results = _detector().detect_batch(bgr, batch_size=_BATCH_SIZE)
        return [self._verdict(found) for found in results]

    def _verdict(self, found: list[dict]) -> Verdict:
        detections = tuple(sorted(((str(d["class"]), float(d["score"])) for d in found), key=lambda d: -d[1]))
        flagged: list[str] = []
        for label, score in detections:
            if label in self.labels and score >= self.threshold and label not in flagged:
                flagged.append(label)
        return Verdict(nsfw=bool(flagged), detections=detections, threshold=self.threshold, flagged=tuple(flagged))

    def __repr__(self) -> str:
        return f"ContentChecker(threshold={self.threshold}, labels={sorted(self.labels)})"


def to_bgr(pixels: Any):
    import numpy as np

    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got shape {pixels.shape} dtype {pixels.dtype}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {pixels.shape}")
    return np.ascontiguousarray(pixels[..., 2::-1])  # RGB(A) -> BGR, as cv2.imread gives
