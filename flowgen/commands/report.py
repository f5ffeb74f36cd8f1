"""`flowgen report` (being built)."""

from flowgen.errors import FlowgenError


def report_command(*args, **kwargs):
    raise FlowgenError("flowgen report is not built yet")
