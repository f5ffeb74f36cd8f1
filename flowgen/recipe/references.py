"""check_references(): every reference image exists and its header is sane (no full decode).

Limits: at most 4 references per item, each side >= 64 px, aspect ratio <= 8, at most 40 MP.
A file whose header claims 20000x20000 is rejected before any pixel is decoded.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Sequence

from flowgen.recipe.item import Item
from flowgen.recipe.spec_values import MAX_REFERENCES

MIN_SIDE = 64
MAX_ASPECT = 8
MAX_PIXELS = 40_000_000
WHERE = "task.inputs.referenceImages"


def image_problem(path: Path) -> str | None:
    """Why `path` is not a usable reference image (from its header only), or None."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        claimed = f" ({int(pixels.group(1)):,} pixels)" if pixels else ""
        return f"is too large{claimed}; the limit is {MAX_PIXELS:,} pixels"
    except UnidentifiedImageError:
        return "is not a readable image (unknown or corrupt format)"
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for damaged headers
        return f"is not a readable image (corrupt header: {err})"
    if min(width, height) < MIN_SIDE:
        return f"is {width}x{height}; each side must be at least {MIN_SIDE} px"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"is {width}x{height}; the aspect ratio must be at most {MAX_ASPECT}:1"
    if width * height > MAX_PIXELS:
        return f"is {width}x{height} ({width * height:,} pixels); the limit is {MAX_PIXELS:,} pixels"
    return None


def reference_problems(items: Sequence[Item]) -> list[str]:
    """One problem per bad file (naming the first item using it) and per item with too many references."""
    users: dict[Path, list[str]] = {}
    problems = []
    for item in items:
        if len(item.references) > MAX_REFERENCES:
            problems.append(f"{WHERE}: item {item.key!r} has {len(item.references)} reference images; at most {MAX_REFERENCES}")
        for path in item.references:
            users.setdefault(Path(path), []).append(item.key)
    for path, keys in users.items():
        problem = image_problem(path)
        if problem:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            problems.append(f"{WHERE}: {_shown(path)} {problem} (item {keys[0]!r}{more})")
    return problems


def _shown(path: Path) -> str:
    """Relative to the working folder when inside it (shorter), else absolute."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if relative.startswith("..") else relative
