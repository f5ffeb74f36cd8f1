"""Ray Data for elastic fleets (`flowgen run RECIPE --ray [ADDRESS]`, extra flowgen[ray]).

The run is a plain run of the whole plan (the folder's lock, the main manifest, the same diff and
canonical batches), whose batches render on a Ray actor pool instead of here: the batches become a
Ray dataset of batch numbers; each actor holds one loaded engine (PipelineEngine, loaded once) and
renders whole batches exactly as the executor's own batch runner does — references, engine call,
face pass, content check, encode, atomic write under the result's deterministic name — and returns
the records. The driver commits them batch by batch in the batches' order: the manifest has one
writer and the progress one place (flowgen.run.batch_rendering).

Exactly once: an actor that dies is restarted by Ray and its batch retried; files it wrote are
written again with the same bytes under the same names (write to a temp file, then rename), and the
driver records each batch once, when its output arrives. A run that stops early (Ctrl-C, --budget,
--fail-fast) removes the files of batches that came back but were not recorded; a batch still in
flight then may leave its files behind, which the next run renders again under the same names.

On GPUs each actor takes num_gpus=1 (one per GPU of the cluster); on CPU hosts num_cpus=0.5, so the
dataset's own tasks keep a CPU (with whole-CPU actors on 2 CPUs they starve). Without ADDRESS Ray
starts a cluster of its own on this machine; the workers load the model from their own cache, so
each node needs the weights where flowgen looks for them (docs/cli.md, Many machines).
"""

from __future__ import annotations

import logging
import pickle
import socket
import time
import warnings
from collections.abc import Generator, Sequence
from typing import Any

from flowgen.errors import FlowgenError
from flowgen.plan.model import Batch, Plan
from flowgen.run.crash import one_line

LOCAL = "local"  # --ray without an address: a cluster of this process's own
CPUS_PER_ACTOR = 0.5


class RayRendering:
    """The executor's BatchRendering on a Ray actor pool; a context manager that holds the connection."""

    def __init__(self, plan: Plan, started_here: bool, progress=None):
        self.plan, self.started_here, self.progress = plan, started_here, progress
        self.load_seconds = 0.0  # the actors load the model: not this process
        self.actors = 0

    @classmethod
    def connect(cls, plan: Plan, address: str, progress=None) -> RayRendering:
        """Connect to the cluster at `address` (LOCAL: start one here), or a one-line FlowgenError;
        nothing is written before this succeeds."""
        try:
            import ray
            import ray.data  # noqa: F401  (the extra installs both)
        except ImportError:
            raise FlowgenError("--ray needs Ray Data, which is not installed: pip install 'flowgen[ray]'") from None
        if address not in (LOCAL, "auto"):
            _check_reachable(address)  # ray.init retries an unreachable address for minutes
        try:
            with warnings.catch_warnings():  # "os.fork() was called" (JAX is loaded): Ray starts its processes
                warnings.simplefilter("ignore", RuntimeWarning)
                if address == LOCAL:  # quiet: flowgen's progress says what runs
                    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
                else:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as err:  # ConnectionError, a timeout, a bad address
            raise FlowgenError(f"--ray {address}: cannot connect to the Ray cluster ({one_line(err)})") from None
        return cls(plan, started_here=address == LOCAL, progress=progress)

    def __enter__(self) -> RayRendering:
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()  # disconnects; stops the cluster when it was started here

    def __call__(self, runner, batches: Sequence[Batch]) -> Generator[tuple[list[dict], list], None, None]:
        """Each batch's (records, finished results) in the batches' order, as the actors return them."""
        if not batches:
            return
        import ray
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # flowgen's own progress says it
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.actors = max(1, min(gpus or int(ray.cluster_resources().get("CPU", 1)), len(batches)))
        per_actor: dict[str, Any] = {"num_cpus": CPUS_PER_ACTOR, **({"num_gpus": 1} if gpus else {})}
        if self.progress is not None:
            self.progress.note(
                f"ray: {len(batches)} batch(es) on {self.actors} actor(s) "
                f"({'1 GPU' if gpus else f'{CPUS_PER_ACTOR} CPU'} each)"
            )
        work = pickle.dumps((self.plan, tuple(batches), runner.summary.run_id))  # each actor's copy of the batches
        numbers = ray.data.from_items([{"number": n} for n in range(len(batches))], override_num_blocks=len(batches))
        rendered = numbers.map_batches(
            BatchActor,
            fn_constructor_args=(work,),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            **per_actor,
        )
        arrived: dict[int, bytes] = {}
        next_number = 0
        try:
            for row in rendered.iter_rows():
                arrived[int(row["number"])] = row["payload"]
                while next_number in arrived:
                    yield _absorb(runner, pickle.loads(arrived.pop(next_number)))
                    next_number += 1
            _remove_dead_writers_temps(batches)
        finally:  # stopped early: batches that came back but were never recorded leave no file
            for payload in arrived.values():
                records, *_ = pickle.loads(payload)
                _remove_outputs(self.plan, records)


def _check_reachable(address: str, seconds: float = 5.0) -> None:
    """A FlowgenError at once when nothing listens at HOST:PORT (or ray://HOST:PORT)."""
    where = address.split("://", 1)[-1].rstrip("/")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise FlowgenError(
            f"--ray {address}: expected HOST:PORT, ray://HOST:PORT or auto (or --ray alone for a local cluster)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as err:
        raise FlowgenError(f"--ray {address}: cannot connect to the Ray cluster ({err.strerror or err})") from None


def _absorb(runner, payload: tuple) -> tuple[list[dict], list]:
    """One batch's result from an actor into the driver's run: its counts and timings into the run's
    summary, its files into those not recorded yet (removed if the run ends before recording them)."""
    records, finished, done, engine_seconds, identity = payload
    summary = runner.summary
    summary.rendered += done.rendered
    summary.failed += done.failed
    summary.flagged += done.flagged
    summary.failures += done.failures
    for stage, seconds in done.stage_seconds.items():
        summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds
    runner.last_engine_seconds = engine_seconds
    runner.engine_identity = runner.engine_identity or identity
    runner.unrecorded += [runner.plan.out_dir / r["output"]["path"] for r in records if r["status"] == "ok"]
    return records, finished


def _remove_dead_writers_temps(batches: Sequence[Batch]) -> None:
    """Every batch came back, so no actor of this run writes any more: a temp file beside one of its
    outputs (`.NAME.PID.tmp`, flowgen.run.atomic) is what a killed actor was writing. Removed."""
    targets = {r.output_path for batch in batches for r in batch.results}
    for folder in {target.parent for target in targets}:
        for temp in folder.glob(".*.tmp"):
            if folder / temp.name[1:].rsplit(".", 2)[0] in targets:
                temp.unlink(missing_ok=True)


def _remove_outputs(plan: Plan, records: list[dict]) -> None:
    for record in records:
        if record["status"] == "ok":
            (plan.out_dir / record["output"]["path"]).unlink(missing_ok=True)


class BatchActor:
    """One Ray actor: a loaded engine and the executor's batch runner; renders the batches it is given."""

    def __init__(self, work: bytes):
        from flowgen.run.engine import PipelineEngine
        from flowgen.run.executor import BatchRunner, RunSummary, content_checker  # the executor's own steps
        from flowgen.run.progress import NullProgress

        plan, self.batches, run_id = pickle.loads(work)
        self._summary = lambda: RunSummary(run_id)
        checker = content_checker([r for batch in self.batches for r in batch.results])
        self.runner = BatchRunner(
            plan, PipelineEngine(plan.engine_model, plan.dtype), self._summary(), NullProgress(), checker
        )

    def __call__(self, rows: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        payloads = []
        for number in rows["number"]:
            self.runner.summary = self._summary()  # this batch's counts alone
            started = time.perf_counter()
            records, finished = self.runner.run(self.batches[int(number)])
            self.runner.recorded()  # the driver records them
            self.runner.summary.seconds = time.perf_counter() - started
            payloads.append(
                pickle.dumps(
                    (
                        records,
                        finished,
                        self.runner.summary,
                        self.runner.last_engine_seconds,
                        self.runner.engine_identity,
                    )
                )
            )
        return {"number": np.asarray(rows["number"]), "payload": np.array(payloads, dtype=object)}
