"""Reference images for editing: load, check and prepare them exactly as diffusers' Klein pipelines do.

Per reference (diffusers `Flux2KleinPipeline` / `Flux2KleinKVPipeline.__call__` + `Flux2ImageProcessor`):
  1. check: both sides >= 64 px, aspect ratio <= 8;
  2. if the area exceeds 1024², LANCZOS-resize to ~1024² keeping the aspect (`_resize_to_target_area`);
  3. floor both sides to multiples of 16 and centre-crop to that size (`preprocess(resize_mode="crop")`:
     Flux2ImageProcessor's crop mode crops, it never resizes again);
  4. convert to RGB (after the resize and crop, as diffusers does), scale to [-1, 1] as float32.

One deliberate difference: we apply the EXIF orientation first (`ImageOps.exif_transpose`). diffusers
does not (PIL's `Image.open` ignores the tag), so a portrait phone photo would reach the model lying on
its side. For images without an orientation tag the result is identical to diffusers'.

Files are opened by flowgen.engine.references.files (regular files of bounded size only), and every
path that reads one (validate, plan, run, regen, serve) judges the header with `image_header` first:
more pixels than the limit is refused before any pixel is decoded. A run's loader then applies step 2
at once (`reduced_for_preparation`), so the full-size pixels live only while being resized. PIL's
JPEG `draft` (decoding at 1/2, 1/4 or 1/8 scale) is deliberately not used: it changes the pixels, so
results would depend on how a reference was loaded and stop matching diffusers and earlier runs.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flowgen.engine.references.files import ReferenceImageError, open_reference
from flowgen.errors import ImageInputError

MAX_REFERENCES = 4
MIN_SIDE = 64
MAX_ASPECT = 8
MAX_AREA = 1024 * 1024  # references larger than this are downscaled to about this many pixels
MULTIPLE = 16  # pixels per latent token (VAE factor 8 x 2x2 patchify)
DEFAULT_OUTPUT_HW = (1024, 1024)  # diffusers: default_sample_size 128 x vae_scale_factor 8
# Pixel limits, judged from the header before any pixel is decoded (image_header). Recipes: 150 MP
# (a camera's largest mode; a 200 MP phone photo, 199.7 MP, must be downscaled first; a
# decompression bomb claims far more). Server inputs come from clients and several decode at once,
# so theirs is lower: 50 MP still takes a 48 or 50 MP phone photo. A decode holds about 4 bytes a
# pixel (PIL keeps RGB as 4), until the loader reduces it to the size the engine uses.
MAX_DECODE_PIXELS = 150_000_000
MAX_SERVE_INPUT_PIXELS = 50_000_000

ImageLike = Image.Image | str | Path


@dataclass(frozen=True)
class ImageHeader:
    format: str | None  # PIL's format name: "JPEG", "PNG", ...
    size: tuple[int, int]  # (width, height) as stored
    upright_size: tuple[int, int]  # (width, height) once the EXIF orientation is applied


def image_header(
    source: str | os.PathLike | BinaryIO, *, label: str | None = None, max_pixels: int | None = None
) -> ImageHeader:
    """Format and size of an image from its header (a path, opened by open_reference, or a binary
    file), after the pixel-limit check every decode path shares: ReferenceImageError (an
    ImageInputError) naming `label` and the limit, never PIL's DecompressionBombError/Warning."""
    if isinstance(source, (str, os.PathLike)):
        label = label or str(source)
        with open_reference(source, label=label) as handle:
            return image_header(handle, label=label, max_pixels=max_pixels)
    label = label or "image"
    try:
        with _opened(source, label, max_pixels) as image:
            return ImageHeader(image.format, image.size, _upright_size(image))
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ReferenceImageError(label, "is not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for damaged headers
        raise ReferenceImageError(label, f"is not a readable image (corrupt header: {_one_line(err)})") from None


def pixel_problem(size: tuple[int, int], max_pixels: int | None = None) -> str | None:
    """Why an image of `size` (width, height) is too large to decode, or None."""
    limit = MAX_DECODE_PIXELS if max_pixels is None else max_pixels
    width, height = size
    if width * height > limit:
        return f"is {width}x{height} ({width * height:,} pixels); the limit is {limit:,} pixels"
    return None


def load_image(path: str | Path, *, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open (open_reference) and fully decode an image file, EXIF orientation applied. Raises
    ImageInputError (ReferenceImageError for the file and pixel-limit checks)."""
    label = name or str(path)
    try:
        with open_reference(path, label=label) as handle, _opened(handle, label, max_pixels) as image:
            image.load()
            _apply_exif_orientation(image, label, in_place=True)  # no full-size copy
            return image
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(f"reference image {label}: not a readable image file") from None
    except MemoryError:
        raise ImageInputError(f"reference image {label}: not enough memory to decode it") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated / corrupt data, unreadable file
        raise ImageInputError(f"reference image {label}: cannot decode ({_one_line(err)})") from None


def reduced_for_preparation(image: Image.Image) -> Image.Image:
    """`image` resized now to the area prepare_reference would resize it to, so its full-size pixels
    need not be kept: prepare_reference then leaves the size alone and its result is bit-identical
    (the same LANCZOS resize of the same pixels, only earlier). Returned unchanged when no resize is
    due, or in the rare case the shape checks would judge the reduced size differently from the full
    one (truncating the sides can tip an aspect ratio just under 8:1 over it)."""
    if image.width * image.height <= MAX_AREA:
        return image
    target = _target_area_size(image.size)
    if _shape_problem(image.size) or _shape_problem(target):
        return image
    return image.resize(target, Image.Resampling.LANCZOS)


def prepare_references(images: Sequence[ImageLike], *, names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Prepare up to 4 reference images as (H, W, 3) float32 arrays in [-1, 1], H and W multiples of 16.

    `images` are PIL images or file paths; `names` (optional, one per image) label errors, which are
    ImageInputError with a one-line message naming the image.
    """
    if len(images) > MAX_REFERENCES:
        raise ImageInputError(f"{len(images)} reference images given; at most {MAX_REFERENCES} are allowed")
    if names is not None and len(names) != len(images):
        raise ValueError("names must have one entry per image")
    prepared = []
    for index, image in enumerate(images):
        label = names[index] if names is not None else _default_name(image, index)
        prepared.append(prepare_reference(image, name=label))
    return prepared


def prepare_reference(image: ImageLike, *, name: str = "reference") -> np.ndarray:
    """One reference: the steps in the module docstring. Returns (H, W, 3) float32 in [-1, 1]."""
    if isinstance(image, Image.Image):
        problem = pixel_problem(image.size)
        if problem:
            raise ReferenceImageError(name, problem)
        image = _apply_exif_orientation(image, name)
    elif isinstance(image, (str, Path)):
        image = load_image(image, name=name)
    else:
        raise ImageInputError(
            f"reference image {name}: expected a file path or a PIL image, got {type(image).__name__}"
        )
    _check_shape(image.size, name)
    try:
        if image.width * image.height > MAX_AREA:
            image = image.resize(_target_area_size(image.size), Image.Resampling.LANCZOS)
        width, height = _floor_to_multiple(image.size)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height)).convert("RGB")
        pixels = np.asarray(image).astype(np.float32) / 255.0
    except (OSError, ValueError) as err:  # e.g. a lazily loaded PIL image whose data is corrupt
        raise ImageInputError(f"reference image {name}: cannot decode ({_one_line(err)})") from None
    return 2.0 * pixels - 1.0


def prepared_size(width: int, height: int) -> tuple[int, int]:
    """(height, width) a reference of this pixel size has after preparation (no decoding needed)."""
    if width * height > MAX_AREA:
        width, height = _target_area_size((width, height))
    width, height = _floor_to_multiple((width, height))
    return height, width


def default_output_size(first_reference_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) diffusers generates at when none is given: the first prepared reference's size,
    or 1024x1024 without references."""
    if first_reference_hw is None:
        return DEFAULT_OUTPUT_HW
    height, width = first_reference_hw
    return int(height), int(width)


def _target_area_size(size: tuple[int, int]) -> tuple[int, int]:
    """diffusers `_resize_to_target_area`: scale both sides by sqrt(MAX_AREA / area), truncating."""
    width, height = size
    scale = math.sqrt(MAX_AREA / (width * height))
    return int(width * scale), int(height * scale)


def _floor_to_multiple(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    return (width // MULTIPLE) * MULTIPLE, (height // MULTIPLE) * MULTIPLE


def _check_shape(size: tuple[int, int], name: str) -> None:
    problem = _shape_problem(size)
    if problem:
        raise ImageInputError(f"reference image {name}: {problem}")


def _shape_problem(size: tuple[int, int]) -> str | None:
    width, height = size
    if width < MIN_SIDE or height < MIN_SIDE:
        return f"{width}x{height} is too small; both sides must be >= {MIN_SIDE} px"
    aspect = max(width / height, height / width)
    if aspect > MAX_ASPECT:
        return f"aspect ratio {aspect:.1f}:1 ({width}x{height}) exceeds {MAX_ASPECT}:1"
    return None


@contextmanager
def _opened(handle: BinaryIO, label: str, max_pixels: int | None) -> Iterator[Image.Image]:
    """PIL's lazy image of `handle` (header read, no pixel decoded), once the pixel limit allows it.

    PIL's own bomb check (a warning above 89 MP, an error above 179 MP) is replaced by ours, whose
    message names the image and the limit."""
    limit = MAX_DECODE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)  # reads the header only
    except Image.DecompressionBombError as err:  # beyond twice PIL's threshold: no size to show, only pixels
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        shown = f" ({int(claimed.group(1)):,} pixels)" if claimed else ""
        raise ReferenceImageError(label, f"is too large{shown}; the limit is {limit:,} pixels") from None
    with image:
        problem = pixel_problem(image.size, limit)
        if problem:
            raise ReferenceImageError(label, problem)
        yield image


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation (5-8 rotate by 90°), as the engine will see the image, from the
    header: a PNG's eXIf chunk counts when it comes before the pixels, as the PNG spec places it (PIL
    would decode the whole image to look for one after them)."""
    width, height = image.size
    try:
        if image.format == "PNG" and "exif" not in image.info:
            orientation = 1
        else:
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is judged when the image is decoded
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _apply_exif_orientation(image: Image.Image, name: str, *, in_place: bool = False) -> Image.Image:
    try:
        if in_place:
            ImageOps.exif_transpose(image, in_place=True)
            return image
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as err:  # malformed EXIF block
        raise ImageInputError(f"reference image {name}: unreadable EXIF data ({_one_line(err)})") from None


def _default_name(image: ImageLike, index: int) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return f"#{index + 1}"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
