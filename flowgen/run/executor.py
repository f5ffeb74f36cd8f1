"""Execute a plan: render what is new or changed, batch by batch, and record every result.

Per batch, as separate steps: decode references (a bad one fails only its item); one engine call
padded to the batch size (its sampling steps reported to the progress); per image: face pass
(ultralytics) and content check (when asked), encode (these three and the engine call are the
render path `flowgen serve` shares: flowgen.run.render), store (atomic write of the file); record:
the batch's records and their deliveries' first states committed in one transaction; deliver:
uploads and webhooks sent in the background (flowgen.run.deliver) while the next batch renders.
A crash at any moment leaves a consistent manifest; a rerun skips what is recorded and verified,
and sends again the deliveries a killed run left pending.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flowgen.delivery.dispatch import Dispatcher, Finished
from flowgen.delivery.log import SinkState
from flowgen.engine import MeshPeerLost
from flowgen.errors import FlowgenError, RecipeError, RunCrashed, StorageError, disk_full
from flowgen.plan.model import Batch, Plan, PlannedResult
from flowgen.plan.run_plan import RunPlan
from flowgen.run.atomic import atomic_write_bytes, remove_stale_temps
from flowgen.run.batch_rendering import BatchRendering, render_locally
from flowgen.run.cost import Budget, seconds_per_image
from flowgen.run.crash import one_line, write_traceback
from flowgen.run.deliver import resend, run_dispatcher
from flowgen.run.engine import Engine
from flowgen.run.faces import load_detector
from flowgen.run.interrupt import StopRequest
from flowgen.run.lock import RunLock
from flowgen.run.manifest import Manifest, manifest_path, run_log_path
from flowgen.run.output_paths import outside_reason
from flowgen.run.progress import NullProgress, Progress
from flowgen.run.records import embedded_metadata, result_record
from flowgen.run.references import ReferenceLoader
from flowgen.run.render import FacePassError, FinishedImage, finish_image, render_batch
from flowgen.run.shards import Share, whole_folder

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
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: {"engine": 0.0, "encode": 0.0, "write": 0.0, "manifest": 0.0}
    )
    failures: list[tuple[str, int, str]] = field(default_factory=list)  # (item_key, index, error)
    died_runs: list[str] = field(default_factory=list)  # earlier runs found dead (killed) at start
    budget_stopped: bool = False  # --budget would have been exceeded by the next batch
    spent: float = 0.0  # USD of engine time this run (flowgen.run.cost)
    flagged: int = 0  # results the content check flagged
    deliveries: dict[str, int] = field(default_factory=dict)  # delivery outcomes: ok / failed / withheld
    removed: int = 0  # results in the manifest that the recipe no longer holds (`flowgen prune` removes them)
    canary: list[dict] = field(default_factory=list)  # golden-seed canary verdicts (flowgen.run.canary)
    canary_failures: list[str] = field(default_factory=list)  # one line per drifted item: nothing was rendered
    started: float = field(default_factory=time.perf_counter)  # when execute() began (perf_counter)
    startup: dict = field(default_factory=dict)  # load / compile / first_image seconds (engine.startup())
    error: str | None = None  # what ended the run early: an unexpected exception, or a file it could not use
    log: str | None = None  # where the traceback of that exception was written

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, 1 when any result failed or the canary found the engine drifted, else 0."""
        if self.interrupted:
            return 130
        return 1 if self.failed or self.canary_failures else 0

    @property
    def complete(self) -> bool:
        """Every planned result is done: nothing failed, held back, interrupted or stopped by the canary."""
        return self.exit_code == 0 and not self.not_run and not self.budget_stopped and not self.stopped_early

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.seconds if self.seconds else 0.0


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + os.urandom(3).hex()


def against_folder(plan: Plan, verify_files: bool = True) -> RunPlan:
    """`plan` against its output folder's manifest as it is now (against nothing when the folder
    has none yet): the value `execute` runs. Takes no lock and writes nothing.
    verify_files=False trusts the manifest for unchanged outputs instead of hashing them again (what
    `run --detach` checks with before the background run checks again)."""
    if not manifest_path(plan.out_dir).exists():
        return plan.against({})
    with Manifest(plan.out_dir, create=False) as manifest:
        return plan.against(manifest.index(), manifest.get, verify_files)


def execute(
    run_plan: RunPlan,
    engine: Engine,
    *,
    limit: int | None = None,
    fail_fast: bool = False,
    progress: Progress | None = None,
    stop: StopRequest | None = None,
    budget: float | None = None,
    deliver_flagged: bool = False,
    delivery_options: dict | None = None,
    run_id: str | None = None,
    share: Share | None = None,
    render_batches: BatchRendering | None = None,
) -> RunSummary:
    """Render every result of `run_plan` that the manifest does not already hold (see module doc).

    run_plan: a plan against its output folder's manifest (`against_folder(plan)`, or one a caller
    holds from Plan.against): taken as given when it was built, outputs verified, against the
    manifest state found under the folder's lock, else built again from its plan there. Either way
    the diff and the batches come from that one value.
    budget: USD of engine time this run may spend (flowgen.run.cost); the run stops before a batch
    that would exceed it. deliver_flagged: deliver results the content check flagged too.
    delivery_options: Dispatcher keywords (retry policy, workers; tests shorten the waits).
    share: this process's share of a plan run by many (flowgen.run.shards: its batches, its lock,
    its own manifest); None: the whole plan in the folder's manifest. render_batches: renders the
    batches elsewhere (flowgen.run.ray_runner) instead of with `engine` here, yielding in order.

    Raises FlowgenError before anything is written when the run must not start (preflight), and
    after it started when a file cannot be used (StorageError: a corrupt manifest, a full disk);
    RunCrashed when an unexpected exception ended it (its traceback in the run's log). Either way
    the run is recorded as failed with the reason, and no image is left on disk without its row."""
    plan = run_plan.plan
    spending = Budget(budget)
    progress = progress or NullProgress()
    stop = stop or StopRequest()
    start = time.perf_counter()
    summary = RunSummary(run_id or new_run_id(), planned=len(plan.results))
    share = share or whole_folder
    run_plan = share.select(run_plan)
    early, checker = preflight(run_plan, engine, limit)
    with share.lock(plan.out_dir, summary.run_id) as lock, share.manifest(plan.out_dir) as manifest:
        index = manifest.index()
        reused = run_plan.is_current(index)
        todo = (run_plan if reused else share.select(plan.against(index, manifest.get))).limited(limit)
        summary.unchanged = len(todo.diff.unchanged)
        blocked, runnable = todo.blocked, todo.runnable
        summary.not_run += todo.held_back
        if not reused and (len(runnable) != len(early) or any(a is not b for a, b in zip(runnable, early))):
            # the manifest changed meanwhile: check again for what runs now
            checker = _refusals(plan, engine, runnable)
        summary.died_runs = manifest.mark_died_runs(summary.run_id)
        stale = remove_stale_temps(_output_folders(plan))  # what killed runs were writing
        if stale:
            progress.note(f"removed {len(stale)} temp file(s) that killed runs left, e.g. {stale[0]}")
        summary.removed = len(todo.diff.removed)
        manifest.record_plan(
            (r.rid for r in plan.results),
            plan.retained_item_ids,
            plan.source.as_record() if plan.source is not None else None,
        )
        manifest.start_run(summary.run_id, plan.recipe_name, plan.recipe_hash, plan.plan_hash)
        runner = BatchRunner(
            plan,
            engine,
            summary,
            progress,
            checker,
            own_rows=getattr(engine, "own_rows", None) if share.lockstep else None,
        )
        dispatcher: Dispatcher | None = None
        rendered = render_locally(runner, ())  # nothing yet: the real one comes below; closed in every case
        went_through = False  # the loop ended by itself (not by an exception)
        try:
            options = {"deliver_flagged": deliver_flagged, **(delivery_options or {})}
            # a killed run's deliveries that never finished: sent again, once
            summary.deliveries = resend(manifest, summary.run_id, plan.out_dir, ("pending",), **options)
            dispatcher = run_dispatcher(manifest, summary.run_id, **options)
            history = list(manifest.records()) if budget is not None else []
            if plan.canary is not None:  # before anything renders: a drifted engine stops the run here
                lock.progress = {"stage": "canary"}  # `status`: checking it, or waiting for the shard that does
                lock.beat()
                summary.canary, summary.canary_failures = share.check_canary(
                    manifest, plan, engine, summary.run_id, progress.note
                )
                if summary.canary_failures:
                    summary.not_run += len(blocked) + len(runnable)
                    blocked, runnable, todo = (), (), todo.limited(0)
            if blocked:  # items that cannot run (e.g. unreadable reference): recorded, never rendered
                progress.note(set_aside_note(blocked))  # said now, not only in the end-of-run summary
                # a result is blocked because its item has an error: `or ""` only tells the type checker
                _commit(manifest, summary, [runner.failed(r, r.item.error or "") for r in blocked])
                summary.failed += len(blocked)
                summary.failures += [(r.item.key, r.result_index, r.item.error or "") for r in blocked]
            batches = todo.batches() if not (fail_fast and blocked) else ()
            share.agree(batches)  # --distributed: every process renders these very batches, in lockstep
            if render_batches is None and hasattr(engine, "expect"):
                engine.expect(batches)  # their programs compile ahead of time while the weights load (run/engine.py)
            rendered = (render_batches or render_locally)(runner, batches)  # lazily, one batch per next()
            summary.stopped_early = bool(fail_fast and blocked)
            progress.start(len(runnable), len(batches))
            set_aside = len(blocked)  # failed before rendering: the progress counts them with the first batch
            lock.progress = {
                "to_render": len(runnable),
                "batches": len(batches),
                "batches_done": 0,
                "rendered": 0,
                "failed": summary.failed,
            }  # every key set now: the heartbeat thread reads it
            lock.beat()
            for number, batch in enumerate(batches):
                halt = "interrupted" if stop.requested else None
                if halt is None and not spending.allows(batch.size, seconds_per_image(history, batch.signature.label)):
                    halt = "budget"
                halt = share.decide(f"batch/{number}", halt)  # --distributed: all halt where any one would
                if halt == "interrupted":
                    summary.interrupted = True
                    summary.not_run += sum(len(b.results) for b in batches[number:])
                    break
                if halt == "budget":
                    summary.budget_stopped = True
                    summary.not_run += sum(len(b.results) for b in batches[number:])
                    break
                records, finished = next(rendered)
                spending.spend(runner.last_engine_seconds, batch.size)
                _commit(manifest, summary, records, dispatcher.first_states(finished))
                runner.recorded()
                for done in finished:
                    dispatcher.submit(done)
                failed = sum(r["status"] == "failed" for r in records)
                summary.batches += 1
                # --distributed: every process renders the whole batch and records its rows; it shows the job's progress
                progress.advance(len(batch.results) if share.lockstep else len(records), failed + set_aside)
                set_aside = 0
                lock.progress.update(rendered=summary.rendered, failed=summary.failed, batches_done=summary.batches)
                lock.beat()
                if fail_fast and share.decide(f"failed/{number}", "fail_fast" if failed else None):
                    summary.stopped_early = True
                    rest = [r for b in batches[number + 1 :] for i, r in enumerate(b.results) if runner.keeps(b, i)]
                    summary.not_run += len(rest)
                    _commit(
                        manifest,
                        summary,
                        [
                            runner.skipped(r, "not run: --fail-fast stopped the run")
                            for r in rest
                            if manifest.get(*r.rid) is None
                        ],
                    )
                    break
            went_through = True
            rendered.close()
        except BaseException as err:
            rendered.close()
            runner.discard_unrecorded()  # written, never recorded: gone, so a rerun renders them
            recorded = _end_run(manifest, plan, summary, progress, dispatcher, spending, start, went_through, err, lock)
            raise _reported(err, summary, plan.out_dir, recorded) from err
        _end_run(manifest, plan, summary, progress, dispatcher, spending, start, went_through, None, lock)
    return summary


def preflight(run_plan: RunPlan, engine: Engine, limit: int | None = None) -> tuple[Sequence[PlannedResult], object]:
    """Everything that refuses a run before anything is written, without taking the folder: raises
    FlowgenError (missing weights, content checker or face detector; nothing the plan holds can run).
    `run --detach` calls it before starting the background process. Returns (the results that would
    run, the content checker the run needs or None): the run reuses them when the manifest is
    unchanged under its lock."""
    # a run refused before it starts (missing weights, ...) leaves nothing behind: the refusals are
    # decided before the lock is taken (which creates the output folder) and before anything is written
    early = run_plan.limited(limit).runnable
    _refuse_when_nothing_can_run(run_plan.plan)
    return early, _refusals(run_plan.plan, engine, early)


def _refuse_when_nothing_can_run(plan: Plan) -> None:
    """Every item of the plan cannot run (e.g. a reference they all share is missing): refused as
    `validate` would, one line per distinct reason, instead of a failed row and a line per result."""
    if not plan.items or any(item.error is None for item in plan.items):
        return
    by_reason: dict[str, list[str]] = {}
    for item in plan.items:
        by_reason.setdefault(item.error or "cannot run", []).append(item.key)
    if len(by_reason) == 1:
        reason, keys = next(iter(by_reason.items()))
        raise RecipeError(f"{reason}: every item of the recipe needs it ({len(keys)} item(s)), so nothing was run")
    raise RecipeError(
        [
            f"{reason} (item {keys[0]!r}"
            + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
            + "); no item of the recipe can run, so nothing was run"
            for reason, keys in by_reason.items()
        ]
    )


def _end_run(
    manifest: Manifest,
    plan: Plan,
    summary: RunSummary,
    progress: Progress,
    dispatcher: Dispatcher | None,
    spending: Budget,
    start: float,
    went_through: bool,
    error: BaseException | None,
    lock: RunLock | None = None,
) -> bool:
    """Wait for the deliveries in flight and record how the run ended: its status and summary, then
    (its lock marked ending, so the next run waits for it rather than being refused: run/lock.py)
    the manifest.jsonl export. After an exception (`error`) the reason is recorded too, and a
    failure here (the same full disk, say) is logged rather than raised over the first one.
    Returns whether the run's end is in the manifest."""
    if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: stopped at once
        summary.interrupted = True
    elif error is not None:
        summary.error = error_reason(error)
        if not isinstance(error, FlowgenError):
            log_path = write_traceback(
                run_log_path(plan.out_dir, summary.run_id), error, f"run {summary.run_id} crashed"
            )
            summary.log = str(log_path) if log_path else None
    recorded = False
    try:
        progress.finish()
        if dispatcher is not None:
            dispatcher.close()  # waits for the deliveries in flight (each bounded by its retry policy)
            for state, count in dispatcher.counts.items():
                summary.deliveries[state] = summary.deliveries.get(state, 0) + count
        summary.spent = round(spending.spent, 6)
        summary.seconds = time.perf_counter() - start
        if summary.log is None and run_log_path(plan.out_dir, summary.run_id).exists():  # a detached run's output
            summary.log = str(run_log_path(plan.out_dir, summary.run_id))
        if summary.interrupted:
            status = "interrupted"
        else:
            status = "failed" if summary.error or summary.exit_code else "ok"
        watermarks = plan.incremental.next_watermarks if plan.incremental is not None else None
        if went_through and summary.complete and watermarks:  # incremental datasets: seen up to here
            manifest.record_watermarks(watermarks, summary.run_id)
        manifest.finish_run(summary.run_id, status, _summary_dict(summary))
        recorded = True
        if lock is not None:
            lock.ended()
        manifest.export_jsonl()
    except Exception as late:
        if error is None:
            raise
        log.warning("run %s: could not record its end after %s: %s", summary.run_id, summary.error, error_reason(late))
    return recorded


def error_reason(err: BaseException) -> str:
    """One line: a FlowgenError's own message, else the exception's type and first line."""
    return str(err) if isinstance(err, FlowgenError) else one_line(err)


def _reported(err: BaseException, summary: RunSummary, out_dir, recorded: bool) -> BaseException:
    """What execute raises for an exception that ended the run: a KeyboardInterrupt or a FlowgenError
    as it is; anything else as RunCrashed, naming the log that holds its traceback."""
    if isinstance(err, (FlowgenError, KeyboardInterrupt)) or not isinstance(err, Exception):
        return err
    where = f"the full traceback is in {summary.log}" if summary.log else "its traceback could not be written"
    return RunCrashed(
        f"run {summary.run_id} crashed: {summary.error}; "
        + (f"recorded as failed in {out_dir}'s manifest" if recorded else "its end could not be recorded")
        + f", no unrecorded image left; {where}"
    )


def _output_folders(plan: Plan) -> set[str]:
    """Every folder the run writes files into: where killed runs' temp files may lie."""
    return {str(plan.out_dir)} | {os.path.dirname(r.output_file) for r in plan.results}


def _refusals(plan: Plan, engine: Engine, runnable: Sequence[PlannedResult]):
    """Raise if the run must not start (missing weights, content checker or face detector: user
    errors, exit 2); returns the content checker the run needs (or None)."""
    engine_dtype = getattr(engine, "dtype", plan.dtype)
    if engine_dtype != plan.dtype:  # the records would claim another dtype
        raise ValueError(f"engine computes in {engine_dtype} but the plan is hashed for {plan.dtype}")
    if (runnable or plan.canary is not None) and hasattr(engine, "preflight"):
        engine.preflight()  # missing weights are a user error (exit 2), not one failure per result
    checker = content_checker(runnable)  # NudeNet missing: a user error before anything runs
    if any(r.job.face_pass is not None for r in runnable):
        load_detector()  # likewise the face pass's detector
    return checker


def set_aside_note(blocked: Sequence[PlannedResult], shown: int = 3) -> str:
    """'2 result(s) set aside (recorded as failed, not rendered): <reason> (item 'k1'); ...', one line."""
    by_reason: dict[str, list[str]] = {}
    for result in blocked:
        keys = by_reason.setdefault(result.item.error or "cannot run", [])
        if result.item.key not in keys:
            keys.append(result.item.key)
    parts = [
        f"{reason} (item {keys[0]!r}" + (f" and {len(keys) - 1} more items" if len(keys) > 1 else "") + ")"
        for reason, keys in list(by_reason.items())[:shown]
    ]
    more = f"; and {len(by_reason) - shown} more reasons" if len(by_reason) > shown else ""
    return f"{len(blocked)} result(s) set aside (recorded as failed, not rendered): " + "; ".join(parts) + more


def content_checker(results: Sequence[PlannedResult]):
    """A loaded ContentChecker when any result asks safety.checkContent, else None."""
    if not any(r.item.delivery.check_content for r in results):
        return None
    from flowgen.safety import ContentChecker

    checker = ContentChecker()
    checker.load()
    return checker


def _commit(manifest: Manifest, summary: RunSummary, records: list[dict], deliveries: Iterable[SinkState] = ()) -> None:
    t0 = time.perf_counter()
    manifest.upsert(records, deliveries)
    summary.stage_seconds["manifest"] += time.perf_counter() - t0


def _summary_dict(summary: RunSummary) -> dict:
    return {
        "planned": summary.planned,
        "unchanged": summary.unchanged,
        "rendered": summary.rendered,
        "failed": summary.failed,
        "not_run": summary.not_run,
        "batches": summary.batches,
        "seconds": round(summary.seconds, 3),
        "stage_seconds": {k: round(v, 4) for k, v in summary.stage_seconds.items()},
        "spent": summary.spent,
        "budget_stopped": summary.budget_stopped,
        "flagged": summary.flagged,
        "deliveries": summary.deliveries,
        "removed": summary.removed,
        **({"canary": summary.canary, "canary_failures": summary.canary_failures} if summary.canary else {}),
        **({"startup": summary.startup} if summary.startup else {}),
        **{key: value for key, value in (("error", summary.error), ("log", summary.log)) if value},
    }


class BatchRunner:
    """Turns one Batch into records and finished results: references, engine call, then per image
    check, encode, store and record."""

    def __init__(
        self,
        plan: Plan,
        engine: Engine,
        summary: RunSummary,
        progress: Progress,
        checker=None,
        own_rows: Callable[[int], Sequence[int]] | None = None,
    ):
        """own_rows(batch size): the rows of a batch this process stores and records (None: all of
        them); a `--distributed` process keeps those its devices computed (flowgen.run.distributed)."""
        self.plan, self.engine, self.summary, self.checker = plan, engine, summary, checker
        self.own_rows = own_rows
        self.last_engine_seconds = 0.0
        self.progress: Progress | None = progress  # None once a step report failed
        self.references = ReferenceLoader()
        self.engine_identity: dict | None = None
        self.unrecorded: list[Path] = []  # files written for the current batch, not yet in the manifest

    def keeps(self, batch: Batch, position: int) -> bool:
        """Whether this process stores and records the row at `position` of `batch` (see own_rows)."""
        return self.own_rows is None or position in self.own_rows(batch.size)

    def recorded(self) -> None:
        """The current batch's records are committed: its files are accounted for."""
        self.unrecorded.clear()

    def discard_unrecorded(self) -> None:
        """Remove the files written since the last commit (the run is ending without recording them):
        no image stays on disk without its manifest row."""
        for path in self.unrecorded:
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                log.warning("could not remove %s (written, never recorded): %s", path, err)
        self.unrecorded.clear()

    def failed(self, result: PlannedResult, error: str, **extra) -> dict:
        return result_record(
            self.plan,
            result,
            status="failed",
            error=error,
            run_id=self.summary.run_id,
            engine=self.engine_identity,
            **extra,
        )

    def skipped(self, result: PlannedResult, reason: str) -> dict:
        return result_record(self.plan, result, status="skipped", error=reason, run_id=self.summary.run_id)

    def run(self, batch: Batch) -> tuple[list[dict], list[Finished]]:
        """The batch's records, and its stored results that have deliveries to make."""
        records: list[dict] = []
        finished: list[Finished] = []
        slots: list[tuple[PlannedResult, list]] = []
        mine = {position for position in range(batch.size) if self.keeps(batch, position)}
        for position, result in enumerate(batch.results):
            try:
                slots.append((result, self.references.load_all(result.job.references)))
            except ValueError as err:
                if position in mine:
                    records.append(self._fail(result, str(err)))
        if not slots:
            return records, finished
        try:
            rendered = render_batch(
                self.engine,
                [(r.job, r.seed, refs) for r, refs in slots],
                batch.size,
                on_step=lambda done: self._step(done, batch.signature.steps),
            )
        except MeshPeerLost:  # no process can complete this batch: the run ends (flowgen.run.distributed)
            raise
        except Exception as err:  # the engine failing one batch must not end the run
            reason = f"engine error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            return records + [self._fail(r, reason) for i, (r, _) in enumerate(slots) if i in mine], finished
        self.last_engine_seconds = rendered.seconds
        self.summary.stage_seconds["engine"] += rendered.seconds
        if not self.summary.startup and hasattr(self.engine, "startup"):  # the run's first images
            first = round(time.perf_counter() - self.summary.started, 3)
            self.summary.startup = {**self.engine.startup(), "first_image": first}
        if self.engine_identity is None:
            self.engine_identity = self.engine.identity()
        per_image = round(rendered.seconds_per_image, 4)  # as recorded: what the cost is of
        engine_timings = {
            "engine_batch": round(rendered.seconds, 4),
            "engine_per_image": per_image,
            "engine_stages": {k: round(v, 4) for k, v in rendered.stages.items()},
        }
        for position, (result, _) in enumerate(slots):
            if position not in mine and result.job.face_pass is None:
                continue  # another process of the mesh stores and records it
            try:
                image = finish_image(
                    self.engine,
                    result.job,
                    result.seed,
                    rendered.images[position],
                    ext=result.output_path.suffix.lstrip(".").lower(),  # output.filename's {ext}
                    metadata=embedded_metadata(self.plan, result),
                    engine_seconds=per_image,
                    checker=self.checker if result.item.delivery.check_content else None,
                    include_cost=result.item.delivery.include_cost,
                )
            except FacePassError as err:  # one image's face pass failing must not end the run
                if position in mine:
                    records.append(self._fail(result, str(err)))
                continue
            if position not in mine:  # its face pass ran here too: the engine calls stay in lockstep
                continue
            record, done = self._store(result, image, rendered.batch_record(result.job, position), engine_timings)
            records.append(record)
            if done is not None and done.sinks():
                finished.append(done)
        return records, finished

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

    def _store(
        self, result: PlannedResult, image: FinishedImage, batch_info: dict, engine_timings: dict
    ) -> tuple[dict, Finished | None]:
        """Write one finished image (atomically) and make its record, and what its sinks need."""
        for stage in ("faces", "check", "encode"):
            if stage in image.timings:
                self.summary.stage_seconds[stage] = self.summary.stage_seconds.get(stage, 0.0) + image.timings[stage]
        self.summary.flagged += bool(image.nsfw)
        outside = outside_reason(self.plan.out_dir, result.output_path)
        if outside:  # a symlinked folder inside OUT: never written through
            return self._fail(result, f"not written: {outside}"), None
        t0 = time.perf_counter()
        try:
            atomic_write_bytes(result.output_path, image.data)  # the file sink: always, flagged or not
        except OSError as err:
            if disk_full(err):  # every next write would fail too: the run stops here, one line
                raise StorageError.about(result.output_path, err, "image") from None
            return self._fail(result, f"cannot write {result.output_path}: {err}"), None
        self.unrecorded.append(result.output_path)
        write = time.perf_counter() - t0
        self.summary.stage_seconds["write"] += write
        self.summary.rendered += 1
        timings = {**engine_timings, **image.timings, "write": round(write, 4)}
        record = result_record(
            self.plan,
            result,
            status="ok",
            run_id=self.summary.run_id,
            output_sha256=hashlib.sha256(image.data).hexdigest(),
            output_bytes=len(image.data),
            timings=timings,
            engine=self.engine_identity,
            batch=batch_info,
            cost=image.cost,
            safety=image.verdict.as_record() if image.verdict else None,
        )
        if image.faces is not None:
            record.update(image.faces)  # "faces" (one entry per detection) and "face_detector"
        delivery = result.item.delivery
        done = Finished(
            item_id=record["item_id"],
            result_index=record["result_index"],
            path=result.output_path,
            filename=record["output"]["path"],
            seed=result.seed,
            task_uuid=record["taskUUID"],
            image_uuid=record["imageUUID"],
            output_type=delivery.output_type,
            upload_endpoint=delivery.upload_endpoint,
            webhook_url=delivery.webhook_url,
            cost=image.cost,
            nsfw=image.nsfw,
            image_url=result.output_path.resolve().as_uri(),
        )
        return record, done
