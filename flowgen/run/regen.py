"""Regenerate recorded results from the manifest alone (no recipe needed).

Each result is re-rendered in a batch as large as the one it was sampled in, with its recorded
reference layout, so the engine runs the same compiled program; with identical software and
hardware the file is byte-identical to the original (`--verify` checks the sha256). The batch
size cannot be smaller: XLA's arithmetic depends on it (measured on CPU with the tiny model: the
sampling loop gives a row of a batch of 8 floats ~1e-5 away from the same row at batch 1, the VAE
decode differs by batch size too, and at 256x256 some pixels then differ by one level). What can be
saved is saved: results that replay alike share a call (an item's results, the items of one
batch), copies of the last of them fill the batch (their prompt is encoded once, their references
prepared once), and only the requested results are encoded and written.
It renders in the dtype recorded for the result unless another one is asked for. The engine
request is built as a run builds it: from the record's Job (job_of) by BatchRequest.for_jobs, with
the references opened by the run's ReferenceLoader.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowgen.engine import MeshPeerLost, reference_sha256
from flowgen.errors import FlowgenError
from flowgen.plan.hashing import BASE_DTYPE, sha256_file
from flowgen.plan.job import Job
from flowgen.run.atomic import atomic_write_bytes
from flowgen.run.engine import MESH_ENV, BatchRequest, Engine, PipelineEngine
from flowgen.run.faces import face_settings
from flowgen.run.manifest import Manifest
from flowgen.run.outputs import encode_image, read_metadata
from flowgen.run.records import metadata_from_record
from flowgen.run.references import ReferenceLoader


@dataclass
class RegenOutcome:
    item_id: str
    result_index: int
    path: Path | None
    sha256: str | None
    recorded_sha256: str | None
    dtype: str = BASE_DTYPE  # the dtype of this render
    recorded_dtype: str = BASE_DTYPE
    error: str | None = None
    batch_size: int | None = None  # the recorded batch size it was rendered at
    call: int | None = None  # the engine call that rendered it (results of one call share its cost)
    mesh: str | None = None  # the device mesh asked for this render (None: the automatic one)
    recorded_mesh: str | None = None  # the mesh its run recorded (None: a record from before meshes)
    mesh_note: str | None = None  # why it did not replay on the recorded mesh, when it could not

    @property
    def matches(self) -> bool:
        return self.error is None and self.sha256 == self.recorded_sha256


def resolve_targets(manifest: Manifest, targets: list[str]) -> list[dict[str, Any]]:
    """Manifest records for item ids, `ID#N` result ids, or image files carrying flowgen metadata."""
    records: list[dict[str, Any]] = []
    for target in targets:
        index: int | None
        if Path(target).is_file():
            meta = read_metadata(target)
            item_id, index = meta["item_id"], int(meta["result_index"])
        else:
            item_id, _, index_text = target.partition("#")
            index = int(index_text) if index_text.isdigit() else None
        candidates = [manifest.get(item_id, index)] if index is not None else list(manifest.records(item_id))
        found = [r for r in candidates if r]
        if not found:
            raise FlowgenError(f"{target}: no such item in the manifest of {manifest.out_dir}")
        records.extend(found)
    return records


def regenerate(
    records: list[dict[str, Any]],
    to_dir: Path,
    engine_for: Callable[..., Engine] | None = None,
    dtype: str | None = None,
    mesh: str | None = None,
) -> list[RegenOutcome]:
    """Re-render `records` into `to_dir` (same relative paths); returns one outcome per record, in order.

    Results that replay with the same program and arithmetic (replay_key) share engine calls, up to
    their recorded batch size per call: an item's results, or several items of one batch, cost one
    call rather than one each. dtype: a resolved dtype for every record; None renders each in the
    dtype recorded for it. engine_for(model, dtype[, mesh]) makes the engine (default: a
    PipelineEngine), only when a result is left to render. mesh: --mesh for every record (None:
    $FLOWGEN_MESH, else the mesh recorded for each when this machine's devices can hold it, else the
    automatic one — a mesh changes float summation order only; `RegenOutcome.mesh_note` says so).
    """
    engines: dict[tuple, Engine] = {}
    engine_for = engine_for or _pipeline_engine
    loader = ReferenceLoader()
    outcomes: list[RegenOutcome] = []
    calls: dict[tuple, list[tuple[dict[str, Any], Job, list, RegenOutcome]]] = {}
    meshes = _MeshChoice(mesh)
    for record in records:
        recorded = record.get("dtype") or BASE_DTYPE
        recorded_mesh = (record.get("batch") or {}).get("mesh")
        use_mesh, note = meshes.choose(recorded_mesh, record["model"]["name"], dtype or recorded)
        # the mesh joins the key only when there is one to ask for (engine_for(model, dtype[, mesh]))
        engine_key: tuple = (record["model"]["name"], dtype or recorded) + ((use_mesh,) if use_mesh else ())
        outcome = RegenOutcome(
            record["item_id"],
            record["result_index"],
            None,
            None,
            record["output"]["sha256"],
            dtype=engine_key[1],
            recorded_dtype=recorded,
            mesh=use_mesh,
            recorded_mesh=recorded_mesh,
            mesh_note=note,
        )
        outcomes.append(outcome)
        inputs = _inputs(record, loader, outcome)
        if inputs is not None:
            job, refs = inputs
            calls.setdefault((engine_key, replay_key(record, job)), []).append((record, job, refs, outcome))
    number = 0
    for (engine_key, _), rows in calls.items():
        if engine_key not in engines:
            engines[engine_key] = engine_for(*engine_key)  # (model, dtype) or (model, dtype, mesh)
        size = recorded_batch_size(rows[0][0])
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            rendered = replay_rows([(record, job, refs) for record, job, refs, _ in chunk], engines[engine_key])
            for (record, job, _, outcome), pixels in zip(chunk, rendered):
                outcome.batch_size, outcome.call = size, number
                if isinstance(pixels, ReplayError):  # one result failing must not hide the others' verdicts
                    outcome.error = str(pixels)
                else:
                    _write(record, job, pixels, to_dir, outcome)
            number += 1
    return outcomes


def _inputs(record: dict[str, Any], loader: ReferenceLoader, outcome: RegenOutcome) -> tuple[Job, list] | None:
    """The record's job and decoded references, or None with outcome.error saying why not."""
    if record["status"] != "ok" or not record.get("batch"):
        outcome.error = f"never rendered (status {record['status']})"
        return None
    job = job_of(record)
    try:
        refs = []
        for path, digest in zip(job.references, job.reference_hashes):
            if reference_sha256(path) != digest:  # a regular file of bounded size, or ValueError
                outcome.error = f"reference {path} changed since the run"
                return None
            refs.append(loader.load(path))
        for path, digest, _ in job.loras:
            if sha256_file(path) != digest:
                outcome.error = f"LoRA {path} changed since the run"
                return None
    except (OSError, ValueError) as err:
        outcome.error = str(err)
        return None
    return job, refs


def _write(record: dict[str, Any], job: Job, pixels, to_dir: Path, outcome: RegenOutcome) -> None:
    rel = Path(record["output"]["path"])
    target = to_dir / (rel if not rel.is_absolute() else rel.name)
    data = encode_image(pixels, target.suffix.lstrip(".").lower(), job.output_quality, metadata_from_record(record))
    atomic_write_bytes(target, data)
    outcome.path, outcome.sha256 = target, hashlib.sha256(data).hexdigest()


class ReplayError(Exception):
    """A recorded result could not be rendered again; the message is one line."""


def recorded_batch_size(record: dict[str, Any]) -> int:
    """The batch size the record's image was sampled at, which its replay must use."""
    batch = record["batch"]
    # records from before one-loop batches carry group_size instead, the batch their loop had
    return int(batch.get("group_size") or batch["size"])


def recorded_layout(record: dict[str, Any]) -> dict[str, Any] | None:
    """The reference layout (and step-cache decisions) to force on the replay; None for records
    older than recorded layouts (the engine chooses, as it did then)."""
    batch = record["batch"]
    if "reference_layout" not in batch:
        return None
    layout = {"reference_layout": batch["reference_layout"], "reference_length": int(batch.get("reference_length", 0))}
    if "step_cache_computed" in batch:
        layout["step_cache_computed"] = str(batch["step_cache_computed"])
    return layout


def replay_key(record: dict[str, Any], job: Job) -> tuple:
    """Results with equal keys replay in one engine call: one compiled program (the job's signature:
    size, steps, guidance, scheduler, step cache, LoRAs; the recorded batch size), one forced
    layout (and step-cache decisions), and — where the layout shares one reference set among the
    rows — the same references. A row's arithmetic depends on the batch's shape and layout, not on
    its batch mates' values, so any such rows may share a call. A record without a recorded layout
    replays alone (the engine would choose the layout from the rows it is given)."""
    layout = recorded_layout(record)
    if layout is None:
        return ("alone", record["item_id"], record["result_index"])
    shared = job.reference_set if layout["reference_layout"] == "shared" else None
    return (job.signature, recorded_batch_size(record), tuple(sorted(layout.items())), shared)


def replay(record: dict[str, Any], job: Job, refs: list, engine: Engine):
    """The image of `record` rendered again exactly as the run rendered it (the canary's path; see
    replay_rows). Raises ReplayError."""
    [pixels] = replay_rows([(record, job, refs)], engine)
    if isinstance(pixels, ReplayError):
        raise pixels
    return pixels


def replay_rows(rows: list[tuple[dict[str, Any], Job, list]], engine: Engine) -> list:
    """The images of `rows` (record, job, decoded references) — which share a replay_key and are at
    most the recorded batch size — rendered again exactly as the run rendered them, in one engine
    call: the recorded batch size and reference layout fix the arithmetic (XLA's results depend on
    the batch size, so a smaller batch would change the bytes), copies of the last row fill the
    batch, a step cache's recorded decisions are replayed (they depend on the batch mates), and the
    face pass runs as the run applied it. One entry per row: the pixels, or a ReplayError."""
    first = rows[0][0]
    request = BatchRequest.for_jobs(
        [(job, int(record["seed"]), refs) for record, job, refs in rows],
        recorded_batch_size(first),
        layout=recorded_layout(first),
    )
    try:
        output = engine.generate_batch(request)
    except MeshPeerLost:  # no result of any call can be rendered: the run (or regen) ends
        raise
    except Exception as err:  # noqa: BLE001 - reported per result, the other calls go on
        return [ReplayError(f"engine error: {_first_line(err)}")] * len(rows)
    results: list[Any] = []
    for (record, job, _), pixels in zip(rows, output.images):
        settings = face_settings(record["params"])
        if settings is None:
            results.append(pixels)
            continue
        try:
            results.append(engine.refine_faces(pixels, settings, int(record["seed"]), loras=job.engine_loras).image)
        except MeshPeerLost:
            raise
        except Exception as err:  # noqa: BLE001 - this result fails, its batch mates stand
            results.append(ReplayError(f"face refinement error: {_first_line(err)}"))
    return results


def cost_line(outcomes: list[RegenOutcome], seconds: float) -> str:
    """What the replay cost: engine calls, rows computed for the results rendered, and why."""
    calls: dict[int, int] = {
        outcome.call: outcome.batch_size
        for outcome in outcomes
        if outcome.call is not None and outcome.batch_size is not None
    }
    if not calls:
        return f"cost: no engine call, {seconds:.1f} s"
    results = sum(1 for outcome in outcomes if outcome.call is not None)
    sizes = ", ".join(str(size) for size in sorted(set(calls.values())))
    return (
        f"cost: {results} result(s) in {len(calls)} engine call(s) at the recorded batch size {sizes} "
        f"({sum(calls.values())} rows computed: another batch size would change the bytes), {seconds:.1f} s"
    )


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def job_of(record: dict[str, Any]) -> Job:
    """The job a manifest record was rendered from: its resolved parameters, the guidance its batch
    ran with (the planner's decision, recorded), its references and their content hashes, and the
    LoRA files and hashes its batch merged (recorded by the executor)."""
    refs = record.get("references") or []
    loras = [(lora["path"], lora["sha256"], lora["weight"]) for lora in (record.get("batch") or {}).get("loras", [])]
    return Job.from_task(
        record["params"],
        guidance=(record.get("batch") or {}).get("guidance"),
        references=[r["path"] for r in refs],
        reference_hashes=[r["sha256"] for r in refs],
        loras=loras,
    )


def _pipeline_engine(model: str, dtype: str, mesh: str | None = None) -> Engine:
    try:
        from flowgen.engine import resolve_model

        return PipelineEngine(resolve_model(model), dtype, mesh)
    except ImportError:  # pragma: no cover - engine without cards
        return PipelineEngine(model, dtype, mesh)


class _MeshChoice:
    """Which mesh a record replays on: the one asked for (--mesh, $FLOWGEN_MESH), else the recorded
    one when this machine's devices can hold it, else the automatic mesh, with a note saying why."""

    def __init__(self, asked: str | None):
        self.asked = asked if asked is not None else (os.environ.get(MESH_ENV, "").strip() or None)
        self._fits: dict[tuple[str, str, str], str | None] = {}  # None: ask for it; "": the automatic one; else why not

    def choose(self, recorded: str | None, model: str, dtype: str) -> tuple[str | None, str | None]:
        """(the mesh to ask for, or None for the automatic one; a note when the recorded one is not used)."""
        if self.asked is not None or recorded is None:
            return self.asked, None
        # a mesh over several processes (`run --distributed`): the same axes on this machine's devices
        # run the same per-device program on the same rows
        recorded = recorded.split(" over ")[0]
        key = (recorded, model, dtype)
        if key not in self._fits:
            from flowgen.engine import mesh_for
            from flowgen.errors import FlowgenError

            try:
                # the automatic mesh when it is the recorded one: the run's loaded engine serves the replay
                self._fits[key] = "" if mesh_for(recorded, model, dtype) == mesh_for(None, model, dtype) else None
            except FlowgenError as err:
                self._fits[key] = str(err)
        problem = self._fits[key]
        if problem == "":
            return None, None
        if problem is None:
            return recorded, None
        return None, (
            f"recorded on mesh {recorded}, which this machine cannot hold ({problem}); replayed on the "
            "automatic mesh (a mesh changes float summation order only: pixels may differ by a level)"
        )
