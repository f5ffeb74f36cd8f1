"""The engine's own error for arguments it refuses.

Raised by `Pipeline.generate` / `img2img` argument checks, step-cache settings, batch layouts and
LoRA names. A FlowgenError, so the CLI and the server show it as one line (exit 2) like any bad
input; the workflow turns it into its own error where it knows the recipe field (plan/loras.py).
Unreadable weights and images keep flowgen.errors' CheckpointError and ImageInputError, which
the workflow raises too.
"""

from __future__ import annotations

from flowgen.errors import FlowgenError


class EngineInputError(FlowgenError):
    """An argument of an engine call is not allowed; the message names it and what is allowed."""


class MeshPeerLost(FlowgenError):
    """A process whose devices are part of the mesh cannot be reached (multi-controller JAX: it died).
    Not a bad input: the call cannot complete anywhere; callers end the run rather than fail a batch."""
