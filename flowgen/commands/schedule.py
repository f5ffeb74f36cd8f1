"""`flowgen schedule` (being built)."""

from flowgen.errors import FlowgenError


def schedule_command(*args, **kwargs):
    raise FlowgenError("flowgen schedule is not built yet")
