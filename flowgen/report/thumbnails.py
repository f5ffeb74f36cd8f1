"""Small JPEG thumbnails as data URIs, so the report is one file that needs nothing beside it."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

THUMBNAIL_SIDE = 256  # longest side in pixels: about 5-15 KB a thumbnail, so thousands stay workable
THUMBNAIL_QUALITY = 75


def thumbnail_data_uri(path: Path, side: int = THUMBNAIL_SIDE) -> str | None:
    """`data:image/jpeg;base64,...` of the image at `path` scaled to fit side x side; None when
    the file cannot be read as an image (the report then says so instead of showing a broken img)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (side, side))  # JPEG decodes at a reduced scale: much faster for big files
            image.thumbnail((side, side))
            rgb = _on_white(image)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _on_white(image: Image.Image) -> Image.Image:
    """RGB for JPEG: transparency is flattened onto white rather than dropped to black."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
