"""`flowgen prune` (being built)."""

from flowgen.errors import FlowgenError


def prune_command(*args, **kwargs):
    raise FlowgenError("flowgen prune is not built yet")
