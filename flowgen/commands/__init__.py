"""What each CLI command does, one module per command; cli.py only parses options.

Imported lazily so `flowgen validate` does not pay for the planner's and runner's imports.
"""

from __future__ import annotations

import importlib

_COMMANDS = {
    "validate_command": "flowgen.commands.validate",
    "plan_command": "flowgen.commands.plan",
    "run_command": "flowgen.commands.run",
    "status_command": "flowgen.commands.status",
    "regen_command": "flowgen.commands.regen",
    "redeliver_command": "flowgen.commands.deliveries",
    "gc_command": "flowgen.commands.deliveries",
    "report_command": "flowgen.commands.report",
    "schedule_command": "flowgen.commands.schedule",
    "prune_command": "flowgen.commands.prune",
    "merge_command": "flowgen.commands.merge",
    "models_command": "flowgen.commands.models",
    "init_command": "flowgen.commands.init",
    "serve_command": "flowgen.commands.serve",
    "convert_command": "flowgen.commands.convert",
}

__all__ = list(_COMMANDS)


def __getattr__(name: str):
    if name in _COMMANDS:
        return getattr(importlib.import_module(_COMMANDS[name]), name)
    raise AttributeError(f"module 'flowgen.commands' has no attribute {name!r}")
