"""Face detection for the face refinement pass (`faces/refine.py`): uint8 RGB image -> face boxes.

    detector = face_detector()                    # NudeNet's ONNX detector (FACE_FEMALE / FACE_MALE)
    detector = face_detector("face_yolov8n.onnx") # or a YOLOv8 detection model exported to ONNX
    faces = detector.detect(pixels)               # [Face(label, score, (x0, y0, x1, y1))], best first

Both run on onnxruntime's CPU provider (the models are small; the accelerator belongs to the generator).

* NudeNet: the detector `flowgen.safety` loads for the content check (one shared instance per
  process), keeping its two face classes. Its post-processing drops scores under 0.25, and its face
  scores are lower than a dedicated face model's: the astronaut photo's face scores 0.72.
* A YOLOv8 ONNX file (e.g. an ultralytics face model exported with `yolo export format=onnx`):
  letterboxed to the model's input size as ultralytics does (aspect kept, centred, grey 114 border),
  its (1, 4 + classes, anchors) output decoded by hand: centre boxes, best class score, scores under
  0.25 dropped, class-agnostic NMS at IoU 0.45. Which classes are faces: those whose name in the
  file's ultralytics metadata contains "face"; all classes when it names none.
"""

from __future__ import annotations

import ast
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flowgen.errors import FlowgenError

NUDENET_FACE_LABELS = ("FACE_FEMALE", "FACE_MALE")
MIN_SCORE = 0.25  # as NudeNet's own NMS: weaker boxes are never reported
NMS_IOU = 0.45
LETTERBOX_GREY = 114
DEFAULT_YOLO_SIZE = 640


class FaceDetectorUnavailable(FlowgenError):
    """The face detector cannot run (package missing, unreadable model file); one-line message."""


@dataclass(frozen=True)
class Face:
    label: str
    score: float
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in image pixels, x1/y1 exclusive

    def as_record(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 4), "box": [round(v, 1) for v in self.box]}


def _box(row: np.ndarray) -> tuple[float, float, float, float]:
    """One (x0, y0, x1, y1) row of a detector's boxes as floats."""
    x0, y0, x1, y1 = (float(v) for v in row)
    return x0, y0, x1, y1


class FaceDetector(Protocol):
    name: str
    identity: dict  # what the manifest records: the detector and its model file's sha256

    def detect(self, pixels: np.ndarray) -> list[Face]: ...


class NudeNetFaces:
    """NudeNet's detector (shared with the content check), face classes only."""

    name = "nudenet"

    def __init__(self) -> None:
        from flowgen import safety

        try:
            self._detector = safety.shared_detector()
        except safety.SafetyUnavailable as err:
            raise FaceDetectorUnavailable(
                f"ultralytics: the default face detector is NudeNet's ({err}); install "
                "'flowgen[safety]' or set FLOWGEN_FACE_DETECTOR to a YOLOv8 .onnx file"
            ) from None
        self.identity = {
            "detector": self.name,
            "classes": list(NUDENET_FACE_LABELS),
            **_file_identity(safety.detector_model_path()),
        }

    def detect(self, pixels: np.ndarray) -> list[Face]:
        from flowgen.safety import to_bgr  # NudeNet reads BGR, as from a file (see flowgen.safety)

        faces = []
        for found in self._detector.detect(to_bgr(pixels)):
            if found["class"] in NUDENET_FACE_LABELS:
                x, y, w, h = (float(v) for v in found["box"])
                faces.append(Face(str(found["class"]), float(found["score"]), (x, y, x + w, y + h)))
        return sorted(faces, key=lambda f: -f.score)


class YoloFaces:
    """A YOLOv8 detection model in ONNX form; see the module docstring."""

    def __init__(self, path: str | Path):
        try:
            import onnxruntime
        except ImportError:
            raise FaceDetectorUnavailable(
                "ultralytics: a YOLO face detector needs onnxruntime: pip install 'flowgen[safety]'"
            ) from None
        self.path = Path(path)
        self.name = f"yolo:{self.path.name}"
        if not self.path.is_file():
            raise FaceDetectorUnavailable(f"face detector {self.path}: file not found (FLOWGEN_FACE_DETECTOR)")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for a bad file
            raise FaceDetectorUnavailable(
                f"face detector {self.path}: not a loadable ONNX model ({' '.join(str(err).split())[:200]})"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_size = _input_size(meta.get("imgsz"), model_input.shape)
        self.names = _class_names(meta.get("names"))
        faces = [i for i, n in self.names.items() if "face" in n.lower()]
        self.face_classes = tuple(sorted(faces)) if faces else None  # None: every class is a face
        classes = [self.names.get(i, f"class{i}") for i in self.face_classes] if self.face_classes else "all"
        self.identity = {"detector": "yolo", "classes": classes, **_file_identity(self.path)}

    def detect(self, pixels: np.ndarray) -> list[Face]:
        blob, scale, pad = letterbox(pixels, self.input_size)
        output = np.asarray(self.session.run(None, {self.input_name: blob})[0])
        if output.ndim != 3 or output.shape[0] != 1 or output.shape[1] < 5:
            raise FaceDetectorUnavailable(
                f"face detector {self.path}: output {output.shape} is not a YOLOv8 "
                "detection head (1, 4 + classes, anchors)"
            )
        boxes, scores, classes = decode_yolov8(output[0], self.face_classes)
        height, width = pixels.shape[:2]
        boxes = unletterbox(boxes, scale, pad, (height, width))
        keep = nms(boxes, scores, NMS_IOU)
        return [
            Face(
                self.names.get(int(classes[i]), f"class{int(classes[i])}"),
                float(scores[i]),
                _box(boxes[i]),
            )
            for i in keep
        ]


# ---- YOLOv8 pre- and post-processing (numpy) ---------------------------------------------------


def letterbox(pixels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(H, W, 3) uint8 RGB -> ((1, 3, h, w) float32 in [0, 1], scale, (pad_x, pad_y)) as ultralytics'
    LetterBox: resized by min(h/H, w/W) keeping the aspect, centred on a grey canvas."""
    from PIL import Image

    target_h, target_w = size
    height, width = pixels.shape[:2]
    scale = min(target_h / height, target_w / width)
    new_w, new_h = round(width * scale), round(height * scale)
    pad_x, pad_y = (target_w - new_w) / 2, (target_h - new_h) / 2
    left, top = round(pad_x - 0.1), round(pad_y - 0.1)
    canvas = np.full((target_h, target_w, 3), LETTERBOX_GREY, np.uint8)
    resized = Image.fromarray(np.ascontiguousarray(pixels[..., :3])).resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas[top : top + new_h, left : left + new_w] = np.asarray(resized)
    blob = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return blob, scale, (float(left), float(top))


def decode_yolov8(
    prediction: np.ndarray, classes: tuple[int, ...] | None = None, min_score: float = MIN_SCORE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's raw head (4 + C, anchors) -> (boxes (K, 4) x0 y0 x1 y1, scores (K,), classes (K,)),
    in the model's input pixels, keeping the best of `classes` (None: all) when >= min_score."""
    rows = prediction.T.astype(np.float32)  # (anchors, 4 + C)
    class_scores = rows[:, 4:]
    if classes is not None:
        class_scores = class_scores[:, list(classes)]
    best = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(rows)), best]
    keep = scores >= min_score
    cx, cy, w, h = (rows[keep, k] for k in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    labels = best[keep] if classes is None else np.asarray(classes)[best[keep]]
    return boxes, scores[keep], labels


def unletterbox(boxes: np.ndarray, scale: float, pad: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Boxes in letterboxed input pixels -> the original image's pixels, clipped to it."""
    height, width = size
    out = (boxes - np.array([pad[0], pad[1], pad[0], pad[1]], np.float32)) / scale
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first; a box is dropped when its IoU
    with a kept one exceeds `iou`."""
    order = list(np.argsort(-scores, kind="stable"))
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    kept: list[int] = []
    while order:
        best, order = order[0], order[1:]
        kept.append(int(best))
        if not order:
            break
        rest = np.asarray(order)
        x0 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = (x1 - x0).clip(0) * (y1 - y0).clip(0)
        overlap = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = [int(i) for i, o in zip(rest, overlap) if o <= iou]
    return kept


def _file_identity(path: str | Path) -> dict[str, str]:
    """The model file's name and sha256 (the manifest records which detector found the faces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"model": Path(path).name, "sha256": digest.hexdigest()}


def _input_size(imgsz: str | None, shape) -> tuple[int, int]:
    """(h, w) the model takes: ultralytics' `imgsz` metadata, else the input's static shape, else 640."""
    try:
        value = ast.literal_eval(imgsz) if imgsz else None  # a literal like "[320, 320]": never executed
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    h, w = (shape[2], shape[3]) if len(shape) == 4 else (None, None)
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    return DEFAULT_YOLO_SIZE, DEFAULT_YOLO_SIZE


def _class_names(names: str | None) -> dict[int, str]:
    """ultralytics' `names` metadata ("{0: 'face'}", a literal) as {index: name}; {} when absent."""
    try:
        value = ast.literal_eval(names) if names else {}
    except (ValueError, SyntaxError):
        return {}
    return {int(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


# ---- one loaded detector per model, per process ------------------------------------------------

_LOADED: dict[str, FaceDetector] = {}
_LOCK = threading.Lock()


def face_detector(path: str | Path | None = None) -> FaceDetector:
    """The detector for `path` (a YOLOv8 .onnx file), or NudeNet's when None; loaded once per process.
    Raises FaceDetectorUnavailable with a one-line message."""
    key = "" if path is None else str(Path(path).resolve())
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = NudeNetFaces() if path is None else YoloFaces(path)
        return _LOADED[key]
