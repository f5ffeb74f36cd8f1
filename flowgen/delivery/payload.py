"""The result dict for one generated image, in the shape Runware's imageInference results take.

{"taskType": "imageInference", "taskUUID": ..., "imageUUID": ...,
 "imageURL" | "imageDataURI" | "imageBase64Data": ...,   # one of them, as outputType asks
 "seed": ..., "cost": ..., "NSFWContent": ...}          # cost / NSFWContent only when known
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from typing import Any

TASK_TYPE = "imageInference"

# outputType value -> the result key that carries the image.
IMAGE_KEYS = {"URL": "imageURL", "dataURI": "imageDataURI", "base64Data": "imageBase64Data"}
OUTPUT_TYPES = tuple(IMAGE_KEYS)

_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}


def content_type_for(extension: str) -> str:
    """MIME type for a file extension or outputFormat: "png", ".PNG", "JPG", "jpeg", "webp"."""
    key = extension.lower().lstrip(".")
    try:
        return _CONTENT_TYPES[key]
    except KeyError:
        allowed = ", ".join(sorted(_CONTENT_TYPES))
        raise ValueError(f"no image content type for extension {extension!r} (allowed: {allowed})") from None


def data_uri(data: bytes, content_type: str) -> str:
    """`data:<content_type>;base64,<data>`, the form outputType "dataURI" delivers."""
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def uuid_from_key(text: str) -> str:
    """A stable UUIDv4-shaped id for `text`: sha256, first 16 bytes, version 4 and RFC 4122 variant bits.

    Used for taskUUID / imageUUID when the recipe gives none, so a rerun reports the same ids.
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def image_result(
    *,
    task_uuid: str,
    image_uuid: str,
    seed: int,
    output_type: str = "URL",
    image: bytes | None = None,
    image_url: str | None = None,
    content_type: str = "image/png",
    cost: float | None = None,
    nsfw_content: bool | None = None,
) -> dict[str, Any]:
    """The result dict for one image.

    output_type "URL" needs `image_url` (where the image can be fetched); "dataURI" and
    "base64Data" need the encoded file bytes in `image` (`content_type` names their format for
    the data URI). `cost` is included only when given (includeCost), `nsfw_content` only when the
    safety check ran.
    """
    if output_type not in IMAGE_KEYS:
        raise ValueError(f"outputType must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}")
    if output_type == "URL":
        if image_url is None:
            raise ValueError('outputType "URL" needs image_url')
        encoded = image_url
    elif image is None:
        raise ValueError(f"outputType {output_type!r} needs the image bytes")
    elif output_type == "dataURI":
        encoded = data_uri(image, content_type)
    else:
        encoded = base64.b64encode(image).decode("ascii")

    result: dict[str, Any] = {
        "taskType": TASK_TYPE,
        "taskUUID": task_uuid,
        "imageUUID": image_uuid,
        IMAGE_KEYS[output_type]: encoded,
        "seed": seed,
    }
    if cost is not None:
        result["cost"] = cost
    if nsfw_content is not None:
        result["NSFWContent"] = nsfw_content
    return result
