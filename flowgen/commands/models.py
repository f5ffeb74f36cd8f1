"""`flowgen models` (being built)."""

from flowgen.errors import FlowgenError


def models_command(*args, **kwargs):
    raise FlowgenError("flowgen models is not built yet")
