"""Execute a plan: render what is new or changed, batch by batch, and record every result.

Per batch: decode references (a bad one fails only its item), one engine call padded to the batch
size (its sampling steps reported to the progress), encode + atomically write each image, then
commit the batch's records in one transaction.
A crash at any moment leaves a consistent manifest; a rerun skips what is recorded and verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

from flowgen.plan.batching import make_batches, signature_label
from flowgen.plan.diff import diff_plan
from flowgen.plan.model import Batch, Plan, PlannedResult
from flowgen.run.atomic import atomic_write_bytes
from flowgen.run.engine import BatchRequest, Engine
from flowgen.run.interrupt import StopRequest
from flowgen.run.lock import RunLock
from flowgen.run.manifest import Manifest
from flowgen.run.outputs import encode_image
from flowgen.run.progress import NullProgress, Progress
from flowgen.run.records import embedded_metadata, result_record
from flowgen.run.references import ReferenceLoader

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    planned: int = 0
    unchanged: int = 0
    rendered: int = 0
    failed: int = 0
    not_run: int = 0
    batches: int = 0
    interrupted: bool = False
    stopped_early: bool = False  # --fail-fast
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"engine": 0.0, "encode": 0.0, "write": 0.0, "manifest": 0.0})
    failures: list[tuple[str, int, str]] = field(default_factory=list)  # (item_key, index, error)
    died_runs: list[str] = field(default_factory=list)  # earlier runs found dead (killed) at start

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, 1 when any result failed, else 0."""
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.seconds if self.seconds else 0.0


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + os.urandom(3).hex()


def execute(
    plan: Plan,
    engine: Engine,
    *,
    limit: int | None = None,
    fail_fast: bool = False,
    progress: Progress | None = None,
    stop: StopRequest | None = None,
) -> RunSummary:
    """Render every result of `plan` that the manifest does not already hold (see module doc)."""
    progress = progress or NullProgress()
    stop = stop or StopRequest()
    start = time.perf_counter()
    summary = RunSummary(new_run_id(), planned=len(plan.results))
    with RunLock(plan.out_dir, summary.run_id), Manifest(plan.out_dir) as manifest:
        summary.died_runs = manifest.mark_died_runs()
        diff = diff_plan(plan, manifest.index(), manifest.get)
        summary.unchanged = len(diff.unchanged)
        todo = diff.to_run
        blocked = [r for r in todo if r.item.error]
        runnable = [r for r in todo if not r.item.error]
        if limit is not None:
            summary.not_run += max(0, len(runnable) - limit)
            runnable = runnable[:limit]
        if getattr(engine, "dtype", plan.dtype) != plan.dtype:  # the records would claim another dtype
            raise ValueError(f"engine computes in {engine.dtype} but the plan is hashed for {plan.dtype}")
        if runnable and hasattr(engine, "preflight"):
            engine.preflight()  # missing weights are a user error (exit 2), not one failure per result
        manifest.start_run(summary.run_id, plan.recipe_name, plan.recipe_hash, plan.plan_hash)
        runner = _BatchRunner(plan, engine, summary, progress)
        if blocked:  # items that cannot run (e.g. unreadable reference): recorded, never rendered
            _commit(manifest, summary, [runner.failed(r, r.item.error) for r in blocked])
            summary.failed += len(blocked)
            summary.failures += [(r.item.key, r.result_index, r.item.error) for r in blocked]
        batches = make_batches(runnable, plan.max_batch) if not (fail_fast and blocked) else []
        summary.stopped_early = bool(fail_fast and blocked)
        progress.start(len(runnable), len(batches))
        try:
            for number, batch in enumerate(batches):
                if stop.requested:
                    summary.interrupted = True
                    summary.not_run += sum(len(b.results) for b in batches[number:])
                    break
                records = runner.run(batch)
                _commit(manifest, summary, records)
                failed = sum(r["status"] == "failed" for r in records)
                summary.batches += 1
                progress.advance(len(records), failed)
                if fail_fast and failed:
                    summary.stopped_early = True
                    rest = [r for b in batches[number + 1 :] for r in b.results]
                    summary.not_run += len(rest)
                    _commit(manifest, summary, [runner.skipped(r, "not run: --fail-fast stopped the run") for r in rest if manifest.get(*r.rid) is None])
                    break
        finally:
            progress.finish()
            summary.seconds = time.perf_counter() - start
            status = "interrupted" if summary.interrupted else ("failed" if summary.failed else "ok")
            manifest.finish_run(summary.run_id, status, _summary_dict(summary))
            manifest.export_jsonl()
    return summary


def _commit(manifest: Manifest, summary: RunSummary, records: list[dict]) -> None:
    t0 = time.perf_counter()
    manifest.upsert(records)
    summary.stage_seconds["manifest"] += time.perf_counter() - t0


def _summary_dict(summary: RunSummary) -> dict:
    return {
        "planned": summary.planned, "unchanged": summary.unchanged, "rendered": summary.rendered,
        "failed": summary.failed, "not_run": summary.not_run, "batches": summary.batches,
        "seconds": round(summary.seconds, 3), "stage_seconds": {k: round(v, 4) for k, v in summary.stage_seconds.items()},
    }


class _BatchRunner:
    """Turns one Batch into records: references, engine call, encode, write."""

    def __init__(self, plan: Plan, engine: Engine, summary: RunSummary, progress: Progress):
        self.plan, self.engine, self.summary = plan, engine, summary
        self.progress: Progress | None = progress  # None once a step report failed
        self.references = ReferenceLoader()
        self.engine_identity: dict | None = None

    def failed(self, result: PlannedResult, error: str, **extra) -> dict:
        return result_record(self.plan, result, status="failed", error=error, run_id=self.summary.run_id, engine=self.engine_identity, **extra)

    def skipped(self, result: PlannedResult, reason: str) -> dict:
        return result_record(self.plan, result, status="skipped", error=reason, run_id=self.summary.run_id)

    def run(self, batch: Batch) -> list[dict]:
        records: list[dict] = []
        slots: list[tuple[PlannedResult, list]] = []
        for result in batch.results:
            try:
                slots.append((result, [self.references.load(p) for p in result.item.references]))
            except ValueError as err:
                records.append(self._fail(result, str(err)))
        if not slots:
            return records
        request = build_request(batch, slots)
        request.on_step = lambda done: self._step(done, request.steps)
        t0 = time.perf_counter()
        try:
            output = self.engine.generate_batch(request)
        except Exception as err:  # the engine failing one batch must not end the run
            reason = f"engine error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            return records + [self._fail(r, reason) for r, _ in slots]
        engine_seconds = time.perf_counter() - t0
        self.summary.stage_seconds["engine"] += engine_seconds
        if self.engine_identity is None:
            self.engine_identity = self.engine.identity()
        for position, (result, _) in enumerate(slots):
            # what regen needs to replay this image bit for bit: the batch size and the engine's
            # reference layout (layout, padded reference length) of the one loop that made it
            layout = output.layouts[position] if position < len(output.layouts) else {}
            batch_info = {"size": batch.size, "position": position, "guidance": batch.signature[3],
                          "signature": signature_label(batch.signature),
                          **{k: v for k, v in layout.items() if k != "batch"}}
            timings = {"engine_batch": round(engine_seconds, 4), "engine_per_image": round(engine_seconds / batch.size, 4),
                       "engine_stages": {k: round(v, 4) for k, v in output.timings.items()}}
            records.append(self._write(result, output.images[position], batch_info, timings))
        return records

    def _step(self, done: int, steps: int) -> None:
        """Report a sampling step (called from inside the engine's loop, maybe on another thread)."""
        if self.progress is None:
            return
        try:
            self.progress.step(done, steps)
        except Exception as err:  # raising here would fail the batch: drop step reports instead
            self.progress = None
            log.warning("step progress disabled: %s: %s", type(err).__name__, err)

    def _fail(self, result: PlannedResult, error: str) -> dict:
        self.summary.failed += 1
        self.summary.failures.append((result.item.key, result.result_index, error))
        return self.failed(result, error)

    def _write(self, result: PlannedResult, pixels, batch_info: dict, timings: dict) -> dict:
        task = result.item.task
        try:
            t0 = time.perf_counter()
            data = encode_image(pixels, result.output_path.suffix.lstrip(".").lower(), task.get("outputQuality"),
                                embedded_metadata(self.plan, result))
            t1 = time.perf_counter()
            atomic_write_bytes(result.output_path, data)
            t2 = time.perf_counter()
        except OSError as err:
            return self._fail(result, f"cannot write {result.output_path}: {err}")
        self.summary.stage_seconds["encode"] += t1 - t0
        self.summary.stage_seconds["write"] += t2 - t1
        self.summary.rendered += 1
        timings = {**timings, "encode": round(t1 - t0, 4), "write": round(t2 - t1, 4)}
        return result_record(self.plan, result, status="ok", run_id=self.summary.run_id,
                             output_sha256=hashlib.sha256(data).hexdigest(), output_bytes=len(data),
                             timings=timings, engine=self.engine_identity, batch=batch_info)


def build_request(batch: Batch, slots: list[tuple[PlannedResult, list]]) -> BatchRequest:
    """One engine request for `slots`, padded with copies of the last slot up to batch.size, so
    the compiled program depends only on the batch size (regen reproduces it exactly)."""
    padded = slots + [slots[-1]] * (batch.size - len(slots))
    width, height, steps, guidance, scheduler = batch.signature
    tasks = [r.item.task for r, _ in padded]
    return BatchRequest(
        prompts=[str(t.get("positivePrompt", "")) for t in tasks],
        seeds=[r.seed for r, _ in padded],
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        negative_prompts=[str(t.get("negativePrompt") or "") for t in tasks] if guidance is not None else None,
        references=[refs for _, refs in padded] if any(refs for _, refs in padded) else None,
        scheduler=None if scheduler == "Default" else scheduler,
    )
