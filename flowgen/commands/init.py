"""`flowgen init` (being built)."""

from flowgen.errors import FlowgenError


def init_command(*args, **kwargs):
    raise FlowgenError("flowgen init is not built yet")
