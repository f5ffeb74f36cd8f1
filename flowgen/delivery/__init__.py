"""Result delivery: webhookURL (POST the result JSON) and uploadEndpoint (PUT the image file).

Building the result (Runware's imageInference result shape, `payload.py`):

    image_result(task_uuid=..., image_uuid=..., seed=..., output_type="URL" | "dataURI" | "base64Data",
                 image=<file bytes> | image_url=<url>, content_type="image/png",
                 cost=None, nsfw_content=None) -> dict
    uuid_from_key(text) -> str              # stable UUIDv4-shaped id when the recipe gives none
    content_type_for("png"|"jpg"|"jpeg"|"webp") -> str;  data_uri(bytes, content_type) -> str

Sending (every function retries per RetryPolicy and returns a Delivery; none raises for HTTP or
network failures, only ValueError for a non-http(s) URL, checked before anything is sent):

    post_result(client, url, payload, *, secret: bytes | None, policy=DEFAULT_POLICY) -> Delivery
    put_file(client, url, path, *, content_type=None, policy=DEFAULT_POLICY) -> Delivery
    send(client, method, url, *, content=None, json_body=None, headers=None, policy=...) -> Delivery

    delivery.ok, delivery.attempts (Attempt: number, started_at, seconds, status_code, error,
    outcome "ok" | "retry" | "gave_up" | "rejected"), delivery.as_record() -> JSON-ready dict

Signing: webhook_secret() reads $FLOWGEN_WEBHOOK_SECRET or the file named by
$FLOWGEN_WEBHOOK_SECRET_FILE (None if neither); receivers check X-Flowgen-Signature with
verify_signature(body, header, secret, tolerance_s=300).

Many at once, one shared client, results in submission order:

    with DeliveryPool(max_workers=4) as pool:
        deliveries = pool.run([lambda c, p=p: post_result(c, url, p, secret=s) for p in payloads])

Recorded URLs are `scheme://host[:port]/path` (a webhook's `scheme://host[:port]/...`): query
strings (presigned signatures) never appear in a Delivery (flowgen.net.redact). The full URLs a
later resend needs are kept apart in a 0600 file: SinkURLs (sink_urls.py). Use check_url() at plan
time to reject bad URLs before any image is rendered.

Runs and the server send through one dispatcher and keep one log of what was sent:
dispatch.Dispatcher (sinks in lanes per destination and API key, first states, resends) records
into a log.DeliveryLog (a run's manifest, the server's store), both holding log.DeliveryTable's
`deliveries` and `delivery_attempts` tables.

Destinations: make_client() connects only to public addresses plus what $FLOWGEN_ALLOW_HOSTS
allows (flowgen.net.policy), checked at connect time on every hop; a refused one is a "rejected"
Delivery. Lanes (pool.py) bounds concurrent deliveries per destination / API key.
"""

from flowgen.delivery.http import (
    DEFAULT_POLICY,
    MAX_BODY_BYTES,
    Attempt,
    Delivery,
    RetryPolicy,
    check_url,
    encode_json,
    redact_url,
    send,
)
from flowgen.delivery.payload import (
    IMAGE_KEYS,
    OUTPUT_TYPES,
    content_type_for,
    data_uri,
    image_result,
    uuid_from_key,
)
from flowgen.delivery.pool import DeliveryPool, Lanes, make_client, origin
from flowgen.delivery.sink_urls import SinkURLs
from flowgen.delivery.upload import put_file
from flowgen.delivery.webhook import SIGNATURE_HEADER, post_result, sign, verify_signature, webhook_secret

__all__ = [
    "DEFAULT_POLICY",
    "IMAGE_KEYS",
    "MAX_BODY_BYTES",
    "OUTPUT_TYPES",
    "SIGNATURE_HEADER",
    "Attempt",
    "Delivery",
    "DeliveryPool",
    "Lanes",
    "RetryPolicy",
    "check_url",
    "content_type_for",
    "data_uri",
    "encode_json",
    "image_result",
    "make_client",
    "origin",
    "post_result",
    "put_file",
    "redact_url",
    "send",
    "sign",
    "SinkURLs",
    "uuid_from_key",
    "verify_signature",
    "webhook_secret",
]
