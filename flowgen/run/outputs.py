"""Encode images (JPG/PNG/WEBP, honouring outputQuality) with flowgen metadata embedded.

Every file carries its item id, result index, seed, content hash and parameters, so any image
leads back to its manifest row:
  PNG        iTXt chunk "flowgen" (compact JSON)
  JPG, WEBP  EXIF UserComment (ASCII-only JSON: non-ASCII is \\u-escaped) + ImageDescription
Encoding is deterministic (no timestamps), so a regenerated image has the same sha256.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from flowgen.errors import ImageInputError

METADATA_KEY = "flowgen"
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_IMAGE_DESCRIPTION = 0x010E
_ASCII_PREFIX = b"ASCII\0\0\0"  # EXIF UserComment character-code header
_JPEG_APP1_LIMIT = 60_000  # an EXIF block must fit one 64 KiB APP1 segment
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def metadata_json(metadata: dict[str, Any]) -> str:
    """Compact, key-sorted, ASCII JSON: deterministic bytes for deterministic files."""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def encode_image(pixels: np.ndarray, ext: str, quality: int | None, metadata: dict[str, Any]) -> bytes:
    """Encode an HxWx3 uint8 array as `ext` (jpg/png/webp) with `metadata` embedded."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB")
    text = metadata_json(metadata)
    buffer = io.BytesIO()
    fmt = PIL_FORMATS[ext]
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt(METADATA_KEY, text, zip=len(text) > 1024)
        image.save(buffer, "PNG", pnginfo=info)
    else:
        if len(text) > _JPEG_APP1_LIMIT:  # too long for EXIF: keep the pointer, drop the params
            text = metadata_json({k: v for k, v in metadata.items() if k != "params"})
        exif = Image.Exif()
        exif[_IMAGE_DESCRIPTION] = f"flowgen item {metadata.get('item_id')} result {metadata.get('result_index')}"
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _ASCII_PREFIX + text.encode("ascii")
        options: dict[str, Any] = {"quality": int(quality if quality is not None else 95), "exif": exif.tobytes()}
        if fmt == "WEBP":
            options["method"] = 4
        image.save(buffer, fmt, **options)
    return buffer.getvalue()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The flowgen metadata embedded in an image file; ImageInputError when there is none."""
    try:
        with Image.open(path) as image:
            text = image.info.get(METADATA_KEY) if image.format == "PNG" else _exif_comment(image)
    except OSError as err:
        raise ImageInputError(f"{path}: not a readable image ({err})") from None
    if not text:
        raise ImageInputError(f"{path}: carries no flowgen metadata (was it written by flowgen run?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ImageInputError(f"{path}: flowgen metadata is not valid JSON") from None


def _exif_comment(image: Image.Image) -> str | None:
    raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, bytes):
        return (
            raw[len(_ASCII_PREFIX) :].decode("ascii", "replace")
            if raw.startswith(_ASCII_PREFIX)
            else raw.decode("utf-8", "replace")
        )
    return raw
