"""What each CLI command does, one module per command; cli.py only parses options."""

from flowgen.commands.validate import validate_command
from flowgen.commands.plan import plan_command
from flowgen.commands.run import run_command
from flowgen.commands.status import status_command
from flowgen.commands.regen import regen_command

__all__ = ["validate_command", "plan_command", "run_command", "status_command", "regen_command"]
