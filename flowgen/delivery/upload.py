"""uploadEndpoint: HTTP PUT of the raw image file, as presigned S3 / GCS / Azure URLs expect.

Only Content-Type is added (httpx sets Content-Length). A presigned URL signs its query and some
headers; adding others (x-amz-*, Authorization, Content-MD5) would break the signature, and the
URL itself is sent exactly as given. If the URL was presigned with a ContentType, `content_type`
must equal it byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from flowgen.delivery.http import DEFAULT_POLICY, Delivery, RetryPolicy, send
from flowgen.delivery.payload import content_type_for


def put_file(
    client: httpx.Client,
    url: str,
    path: str | Path,
    *,
    content_type: str | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Delivery:
    """PUT the bytes of `path` to `url` with retries. `content_type` defaults from the extension."""
    path = Path(path)
    if content_type is None:
        content_type = content_type_for(path.suffix)
    data = path.read_bytes()  # in memory so each retry resends the same bytes; images are small
    return send(client, "PUT", url, content=data, headers={"Content-Type": content_type}, policy=policy)
