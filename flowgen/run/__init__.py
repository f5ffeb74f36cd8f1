"""The runner: batches -> engine -> images (atomic, metadata embedded) + the crash-safe manifest."""

from flowgen.run.engine import BatchOutput, BatchRequest, Engine, FakeEngine, PipelineEngine
from flowgen.run.executor import RunSummary, against_folder, execute
from flowgen.run.manifest import Manifest

__all__ = [
    "BatchOutput",
    "BatchRequest",
    "Engine",
    "FakeEngine",
    "Manifest",
    "PipelineEngine",
    "RunSummary",
    "against_folder",
    "execute",
]
