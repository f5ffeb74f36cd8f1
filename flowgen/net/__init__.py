"""Where flowgen may connect, for how long, and how URLs are recorded.

policy.py     DestinationPolicy: public addresses plus the operator's allow-list
              ($FLOWGEN_ALLOW_HOSTS, serve --allow-host); DestinationRefused
transport.py  guarded_client(policy): httpx clients that check each address they connect to
              (after DNS, on every redirect hop, pinned against rebinding); time_limit(s): a
              wall-clock deadline for a request, headers and body included
fetch.py      fetch_bytes(): one bounded GET (bytes, deadline, redirects); FetchSlots: fetches
              in flight per key
redact.py     redact_url / redact_webhook_url / redacted_task / redacted_values: URLs (and the
              dataset values they were built from) as records hold them
"""

from flowgen.net.fetch import FetchError, FetchSlots, TooManyFetches, fetch_bytes
from flowgen.net.policy import (
    ALLOW_ALL,
    ALLOW_ENV,
    DestinationPolicy,
    DestinationRefused,
    is_public,
)
from flowgen.net.redact import (
    URL_FIELDS,
    redact_url,
    redact_webhook_url,
    redacted_task,
    redacted_values,
    scrub,
)
from flowgen.net.transport import guarded_client, time_limit

__all__ = [
    "ALLOW_ALL",
    "ALLOW_ENV",
    "URL_FIELDS",
    "DestinationPolicy",
    "DestinationRefused",
    "FetchError",
    "FetchSlots",
    "TooManyFetches",
    "fetch_bytes",
    "guarded_client",
    "is_public",
    "redact_url",
    "redact_webhook_url",
    "redacted_task",
    "redacted_values",
    "scrub",
    "time_limit",
]
