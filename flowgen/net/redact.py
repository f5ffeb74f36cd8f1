"""URLs as flowgen records them: without the parts that are secrets.

A presigned upload URL carries its signature in the query string (X-Amz-Signature, X-Goog-Signature,
sig, token, ...), a URL may carry a password in its userinfo, and a webhook URL is a capability as a
whole: Slack, Discord and Zapier put the secret in its path. What reaches a record, a manifest, a
log line, an error text or the server's task store is therefore:

    redact_url(url)          scheme://host[:port]/path   (no userinfo, query or fragment)
    redact_webhook_url(url)  scheme://host[:port]/...    (the path too, when there is one)
    redacted_task(task)      a copy of a task with its webhookURL / uploadEndpoint redacted so
    redacted_values(values, task)  dataset values with the pieces of those URLs' secrets removed
                             (per-item presigned URLs come from a dataset column)

What delivery needs (the full URLs) is kept apart, in a 0600 file that is never exported
(flowgen.delivery.sink_urls).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

# The task fields that hold a destination URL, and how each is recorded.
URL_FIELDS = ("webhookURL", "uploadEndpoint")


def redact_url(url: str) -> str:
    """`scheme://host[:port]/path`: no userinfo, query or fragment."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def redact_webhook_url(url: str) -> str:
    """`scheme://host[:port]/...`: a webhook URL's path may be its secret."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}" + ("/..." if parts.path not in ("", "/") else parts.path)


def redacted_task(task: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `task` whose webhookURL / uploadEndpoint are recorded without their secrets."""
    out = dict(task)
    if isinstance(out.get("webhookURL"), str):
        out["webhookURL"] = redact_webhook_url(out["webhookURL"])
    if isinstance(out.get("uploadEndpoint"), str):
        out["uploadEndpoint"] = redact_url(out["uploadEndpoint"])
    return out


def secret_parts(task: Mapping[str, Any]) -> list[str]:
    """What redacted_task removes from the task's URLs: query, userinfo, fragment, a webhook's path."""
    parts = []
    for name in URL_FIELDS:
        url = task.get(name)
        if isinstance(url, str):
            split = urlsplit(url)
            parts += [split.query, split.netloc.rpartition("@")[0], split.fragment]
            if name == "webhookURL" and split.path not in ("", "/"):
                parts.append(split.path)
    return [part for part in parts if part]


# A dataset value shorter than this is not taken for a piece of a secret ("png" may well appear in
# a signed query string); signatures and tokens are far longer.
_MIN_SECRET_PIECE = 8


def redacted_values(values: Any, task: Mapping[str, Any]) -> Any:
    """`values` (an item's dataset values, any JSON) with every string that holds, or is a piece of,
    a secret part of the task's URLs replaced: a URL by its redacted form, anything else by
    "<redacted>"."""
    secrets = secret_parts(task)
    if not secrets:
        return values

    def holds(text: str) -> bool:
        return any(secret in text or (len(text) >= _MIN_SECRET_PIECE and text in secret) for secret in secrets)

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list):
            return [clean(item) for item in value]
        if isinstance(value, str) and holds(value):
            shown = redact_url(value) if value.lower().startswith(("http://", "https://")) else value
            return shown if not holds(shown) else "<redacted>"
        return value

    return clean(values)


def scrub(text: str, url: str) -> str:
    """`text` (an exception's message, say) with `url`'s secrets (query, userinfo, the URL itself)
    replaced, should a library have echoed them."""
    parts = urlsplit(url)
    text = text.replace(url, redact_url(url))
    for secret in (parts.query, parts.netloc.rpartition("@")[0], parts.fragment):
        if secret:
            text = text.replace(secret, "<redacted>")
    return text
