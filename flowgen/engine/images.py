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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flowgen.errors import ImageInputError

MAX_REFERENCES = 4
MIN_SIDE = 64
MAX_ASPECT = 8
MAX_AREA = 1024 * 1024  # references larger than this are downscaled to about this many pixels
MULTIPLE = 16  # pixels per latent token (VAE factor 8 x 2x2 patchify)
DEFAULT_OUTPUT_HW = (1024, 1024)  # diffusers: default_sample_size 128 x vae_scale_factor 8
# Refuse to decode anything bigger (a 200 MP phone photo in full-resolution mode is 199.7 MP; a
# decompression bomb is usually far larger). We decide from the header, before decoding.
MAX_DECODE_PIXELS = 150_000_000

ImageLike = Image.Image | str | Path


def load_image(path: str | Path, *, name: str | None = None) -> Image.Image:
    """Open and fully decode an image file, EXIF orientation applied. Raises ImageInputError."""
    label = name or str(path)
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"reference image {label}: file not found")
    try:
        with warnings.catch_warnings():
            # our own pixel limit below replaces PIL's warning threshold (89 MP)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
        _check_decode_size(image.size, label)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except ImageInputError:
        raise
    except Image.DecompressionBombError:
        raise ImageInputError(
            f"reference image {label}: too many pixels to decode safely (limit {MAX_DECODE_PIXELS:,}); "
            "downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise ImageInputError(f"reference image {label}: not a readable image file") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated / corrupt data, unreadable file
        raise ImageInputError(f"reference image {label}: cannot decode ({_one_line(err)})") from None
    return _apply_exif_orientation(image, label)


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
        _check_decode_size(image.size, name)
        image = _apply_exif_orientation(image, name)
    elif isinstance(image, (str, Path)):
        image = load_image(image, name=name)
    else:
        raise ImageInputError(f"reference image {name}: expected a file path or a PIL image, got "
                              f"{type(image).__name__}")
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
    return tuple((side // MULTIPLE) * MULTIPLE for side in size)


def _check_shape(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageInputError(f"reference image {name}: {width}x{height} is too small; both sides must be "
                              f">= {MIN_SIDE} px")
    aspect = max(width / height, height / width)
    if aspect > MAX_ASPECT:
        raise ImageInputError(f"reference image {name}: aspect ratio {aspect:.1f}:1 ({width}x{height}) exceeds "
                              f"{MAX_ASPECT}:1")


def _check_decode_size(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width * height > MAX_DECODE_PIXELS:
        raise ImageInputError(f"reference image {name}: {width}x{height} has too many pixels to decode safely "
                              f"(limit {MAX_DECODE_PIXELS:,}); downscale it first")


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as err:  # malformed EXIF block
        raise ImageInputError(f"reference image {name}: unreadable EXIF data ({_one_line(err)})") from None


def _default_name(image: ImageLike, index: int) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return f"#{index + 1}"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
