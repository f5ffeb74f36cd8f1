"""Face refinement (the spec's `ultralytics`): find faces in a decoded image and re-render each with Klein.

    settings = FaceRefineSettings(positive_prompt="a portrait photo", strength=0.3, steps=20)
    result = refine_faces(pipe, pixels, settings, seed=7)     # pixels: (H, W, 3) uint8
    result.image      # the image with its faces refined
    result.faces      # per detection: label, score, box, and the region it changed (or why not)
    result.detector   # which detector found them (its model file's sha256)

Per face scoring at least `confidence` (`faces/detect.py`: NudeNet's face classes by default, or a
YOLOv8 .onnx file):
1. the padded box: the detection box grown by `mask_padding` pixels on each side, inside the image;
2. the crop: the smallest square around the padded box that fits in the image (the padded box's
   own rectangle when the image is narrower), resized (LANCZOS) to `inpaint_size`² — one shape, so
   one compiled sampling loop serves every face;
3. Klein img2img (`Pipeline.img2img`) at `strength`, `steps`, guidance, the settings' prompts and
   the result's seed; the refined crop is resized back;
4. pasted through the feathered mask: the padded box drawn shrunk by the blur's reach and blurred
   with `ImageFilter.GaussianBlur(mask_blur)`, so the feather lies inside the padded box (a blur
   too wide for the box is narrowed until its feather fits in a quarter of the box's shorter side:
   the middle stays fully refined). Every pixel outside the padded box keeps its input bytes.

Faces are refined one after another, each on the image the previous one left, at batch 1.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from flowgen.engine.faces.detect import Face, FaceDetector, face_detector

PIXELS_PER_TOKEN = 16


@dataclass(frozen=True)
class FaceRefineSettings:
    """What the pass does; the spec's ultralytics defaults. `detector`: a YOLOv8 .onnx path, or None
    for NudeNet's face classes."""

    positive_prompt: str
    negative_prompt: str = ""
    confidence: float = 0.9
    inpaint_size: int = 1024
    mask_blur: int = 5
    mask_padding: int = 5
    steps: int = 20
    strength: float = 0.3
    guidance: float | None = 8.0  # CFG for base models (<= 1: none; None: the model's); distilled: none
    detector: str | None = None

    @property
    def crop_side(self) -> int:
        """The side the crop is sampled at: inpaint_size floored to a multiple of 16 (>= 16)."""
        return max(PIXELS_PER_TOKEN, self.inpaint_size // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN)


@dataclass
class FaceRefineResult:
    image: np.ndarray  # (H, W, 3) uint8
    faces: list[dict[str, Any]] = field(default_factory=list)  # one entry per detection, best first
    seconds: float = 0.0
    detector: dict[str, Any] = field(default_factory=dict)  # the detector's identity (faces/detect.py)

    @property
    def refined(self) -> int:
        return sum(bool(f.get("refined")) for f in self.faces)


def refine_faces(
    pipe,
    pixels: np.ndarray,
    settings: FaceRefineSettings,
    seed: int,
    *,
    detector: FaceDetector | None = None,
    loras=None,
) -> FaceRefineResult:
    """Refine every face of `pixels` scoring >= settings.confidence (see the module docstring).

    pipe: a `Pipeline` (its `img2img`); detector: default `face_detector(settings.detector)`;
    loras: as `Pipeline.generate` takes them (the refinement uses the image's own weights).
    """
    from flowgen.engine.pipeline import img2img_start

    start = time.perf_counter()
    detector = detector or face_detector(settings.detector)
    image = np.array(pixels, dtype=np.uint8, copy=True)
    height, width = image.shape[:2]
    nothing_to_sample = img2img_start(settings.strength, settings.steps) >= settings.steps
    faces = []
    for face in detector.detect(image):
        entry = face.as_record()
        if face.score < settings.confidence:
            entry.update(refined=False, why=f"score below confidence {settings.confidence:g}")
        elif nothing_to_sample:
            entry.update(refined=False, why=f"strength {settings.strength:g} leaves no step to sample")
        else:
            box = padded_box(face, settings.mask_padding, (height, width))
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                entry.update(refined=False, why="empty box")
            else:
                image = _refine_one(pipe, image, box, settings, seed, loras)
                size = (box[3] - box[1], box[2] - box[0])
                entry.update(refined=True, region=list(box), mask_blur=fitted_blur(size, settings.mask_blur))
        faces.append(entry)
    return FaceRefineResult(
        image,
        faces,
        round(time.perf_counter() - start, 4),
        dict(getattr(detector, "identity", None) or {"detector": detector.name}),
    )


def _refine_one(
    pipe, image: np.ndarray, box: tuple[int, int, int, int], settings: FaceRefineSettings, seed: int, loras
) -> np.ndarray:
    """The image with the padded box `box` re-rendered and pasted back through the feathered mask."""
    height, width = image.shape[:2]
    cx0, cy0, cx1, cy1 = crop_box(box, (height, width))
    side = settings.crop_side
    crop = Image.fromarray(image[cy0:cy1, cx0:cx1]).resize((side, side), Image.Resampling.LANCZOS)
    # base models: CFGScale as given (<= 1 means one conditional pass); distilled models take none
    out = pipe.img2img(
        [np.asarray(crop)],
        [settings.positive_prompt],
        settings.strength,
        steps=settings.steps,
        seeds=[seed],
        guidance=None if pipe.distilled else settings.guidance,
        negative_prompts=[settings.negative_prompt],
        loras=loras,
    )
    refined = np.asarray(Image.fromarray(out.images[0]).resize((cx1 - cx0, cy1 - cy0), Image.Resampling.LANCZOS))
    x0, y0, x1, y1 = box
    region = refined[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0]
    return paste(image, region, box, feathered_mask((y1 - y0, x1 - x0), settings.mask_blur))


# ---- geometry and masks (numpy / PIL; no JAX) ----------------------------------------------------


def padded_box(face: Face, padding: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The detection box grown by `padding` pixels per side, to whole pixels, inside the image:
    (x0, y0, x1, y1), x1/y1 exclusive."""
    height, width = size
    x0, y0, x1, y1 = face.box
    return (
        max(0, math.floor(x0) - padding),
        max(0, math.floor(y0) - padding),
        min(width, math.ceil(x1) + padding),
        min(height, math.ceil(y1) + padding),
    )


def crop_box(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The smallest square holding `box` that fits in the image, centred on it where it can be;
    along a side shorter than the square, that whole side."""
    height, width = size
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)

    def span(lo: int, hi: int, limit: int) -> tuple[int, int]:
        if side >= limit:
            return 0, limit
        start = min(max(0, (lo + hi - side) // 2), limit - side)
        return start, start + side

    cx0, cx1 = span(x0, x1, width)
    cy0, cy1 = span(y0, y1, height)
    return cx0, cy0, cx1, cy1


@functools.cache
def blur_reach(radius: int) -> int:
    """How many pixels past an edge `ImageFilter.GaussianBlur(radius)` carries any value (measured on
    a step, so it is PIL's own support, not an estimate)."""
    if radius <= 0:
        return 0
    length = 8 * radius + 16
    step = Image.new("L", (2 * length, 1), 0)
    step.paste(255, (length, 0, 2 * length, 1))
    row = np.asarray(step.filter(ImageFilter.GaussianBlur(radius)))[0]
    return int(length - np.flatnonzero(row)[0])


def fitted_blur(size: tuple[int, int], blur: int) -> int:
    """The blur radius used for a padded box of (h, w): `blur`, or the largest smaller one whose
    feather fits in a quarter of the box's shorter side (so the middle half stays fully refined)."""
    budget = min(size) // 4
    radius = max(0, int(blur))
    while radius > 0 and 2 * blur_reach(radius) + 1 > budget:  # the inset, then the blur's spread inwards
        radius -= 1
    return radius


def feathered_mask(size: tuple[int, int], blur: int) -> np.ndarray:
    """(h, w) float32 in [0, 1] for a padded box of that size: 1 in the middle, feathered by a
    Gaussian blur of `fitted_blur(size, blur)` towards 0 at the box's edge. The box is drawn shrunk by
    the blur's reach + 1 before blurring, so the feather stays inside and the box's own rim is 0,
    joining the untouched outside seamlessly."""
    height, width = size
    radius = fitted_blur(size, blur)
    inset = blur_reach(radius) + 1 if radius else 0
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (inset, inset, width - inset, height - inset))
    if radius:
        mask = mask.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(mask, dtype=np.float32) / 255.0


def paste(image: np.ndarray, region: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray) -> np.ndarray:
    """`image` with `region` blended into `box` by `mask` (1: region, 0: image). Where the mask is 0
    the image's bytes are kept exactly."""
    x0, y0, x1, y1 = box
    out = image.copy()
    below = image[y0:y1, x0:x1].astype(np.float32)
    alpha = mask[..., None]
    blended = np.clip(np.round(below + alpha * (region.astype(np.float32) - below)), 0, 255).astype(np.uint8)
    out[y0:y1, x0:x1] = np.where(alpha > 0, blended, image[y0:y1, x0:x1])
    return out
