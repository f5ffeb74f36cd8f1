"""Regenerate recorded results from the manifest alone (no recipe needed).

Each result is re-rendered in a batch filled with copies of itself, as large as the group it was
sampled in (the engine samples each reference-set group of a batch together; without references
that is the whole padded batch), so the engine runs the same compiled program; with identical
software and hardware the file is byte-identical to the original (`--verify` checks the sha256).
It renders in the dtype recorded for the result unless another one is asked for. The engine
request is built as a run builds it: from the record's Job (job_of) by BatchRequest.for_jobs, with
the references opened by the run's ReferenceLoader.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flowgen.engine.reference_files import reference_sha256
from flowgen.errors import FlowgenError
from flowgen.plan.hashing import BASE_DTYPE, sha256_file
from flowgen.plan.job import Job
from flowgen.run.atomic import atomic_write_bytes
from flowgen.run.engine import BatchRequest, Engine, PipelineEngine
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

    @property
    def matches(self) -> bool:
        return self.error is None and self.sha256 == self.recorded_sha256


def resolve_targets(manifest: Manifest, targets: list[str]) -> list[dict[str, Any]]:
    """Manifest records for item ids, `ID#N` result ids, or image files carrying flowgen metadata."""
    records: list[dict[str, Any]] = []
    for target in targets:
        if Path(target).is_file():
            meta = read_metadata(target)
            item_id, index = meta["item_id"], int(meta["result_index"])
        else:
            item_id, _, index_text = target.partition("#")
            index = int(index_text) if index_text.isdigit() else None
        found = [manifest.get(item_id, index)] if index is not None else list(manifest.records(item_id))
        found = [r for r in found if r]
        if not found:
            raise FlowgenError(f"{target}: no such item in the manifest of {manifest.out_dir}")
        records.extend(found)
    return records


def regenerate(records: list[dict[str, Any]], to_dir: Path, engine_for: Callable[[str, str], Engine] | None = None,
               dtype: str | None = None) -> list[RegenOutcome]:
    """Re-render `records` into `to_dir` (same relative paths); returns one outcome per record.

    dtype: a resolved dtype for every record; None renders each in the dtype recorded for it.
    engine_for(model, dtype) makes the engine (default: a PipelineEngine).
    """
    engines: dict[tuple[str, str], Engine] = {}
    engine_for = engine_for or _pipeline_engine
    loader = ReferenceLoader()
    outcomes = []
    for record in records:
        recorded = record.get("dtype") or BASE_DTYPE
        key = (record["model"]["name"], dtype or recorded)
        if key not in engines:
            engines[key] = engine_for(*key)
        outcome = RegenOutcome(record["item_id"], record["result_index"], None, None, record["output"]["sha256"],
                               dtype=key[1], recorded_dtype=recorded)
        outcomes.append(_regen_one(record, to_dir, engines[key], loader, outcome))
    return outcomes


def _regen_one(record: dict[str, Any], to_dir: Path, engine: Engine, loader: ReferenceLoader,
               outcome: RegenOutcome) -> RegenOutcome:
    if record["status"] != "ok" or not record.get("batch"):
        outcome.error = f"never rendered (status {record['status']})"
        return outcome
    job = job_of(record)
    try:
        refs = []
        for path, digest in zip(job.references, job.reference_hashes):
            if reference_sha256(path) != digest:  # a regular file of bounded size, or ValueError
                outcome.error = f"reference {path} changed since the run"
                return outcome
            refs.append(loader.load(path))
        for path, digest, _ in job.loras:
            if sha256_file(path) != digest:
                outcome.error = f"LoRA {path} changed since the run"
                return outcome
    except (OSError, ValueError) as err:
        outcome.error = str(err)
        return outcome
    try:
        pixels = replay(record, job, refs, engine)
    except ReplayError as err:  # one result failing must not hide the others' verdicts
        outcome.error = str(err)
        return outcome
    rel = Path(record["output"]["path"])
    target = to_dir / (rel if not rel.is_absolute() else rel.name)
    data = encode_image(pixels, target.suffix.lstrip(".").lower(), job.output_quality,
                        metadata_from_record(record))
    atomic_write_bytes(target, data)
    outcome.path, outcome.sha256 = target, hashlib.sha256(data).hexdigest()
    return outcome


class ReplayError(Exception):
    """A recorded result could not be rendered again; the message is one line."""


def replay(record: dict[str, Any], job: Job, refs: list, engine: Engine):
    """The image of `record` rendered again exactly as the run rendered it (the regen and canary
    path): its recorded batch size and reference layout fix the arithmetic, the row's copies fill
    the batch, a step cache's recorded decisions are replayed (they depend on the batch mates),
    and the face pass runs as the run applied it. Raises ReplayError."""
    batch = record["batch"]
    # records from before one-loop batches carry group_size instead, the batch their loop had
    size = int(batch.get("group_size") or batch["size"])
    layout = None
    if "reference_layout" in batch:
        layout = {"reference_layout": batch["reference_layout"], "reference_length": int(batch.get("reference_length", 0))}
        if "step_cache_computed" in batch:
            layout["step_cache_computed"] = str(batch["step_cache_computed"])
    try:
        output = engine.generate_batch(BatchRequest.for_jobs([(job, int(record["seed"]), refs)], size, layout=layout))
    except Exception as err:
        raise ReplayError(f"engine error: {_first_line(err)}") from err
    pixels = output.images[0]
    settings = face_settings(record["params"])
    if settings is not None:
        try:
            pixels = engine.refine_faces(pixels, settings, int(record["seed"]), loras=job.engine_loras).image
        except Exception as err:
            raise ReplayError(f"face refinement error: {_first_line(err)}") from err
    return pixels


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def job_of(record: dict[str, Any]) -> Job:
    """The job a manifest record was rendered from: its resolved parameters, the guidance its batch
    ran with (the planner's decision, recorded), its references and their content hashes, and the
    LoRA files and hashes its batch merged (recorded by the executor)."""
    refs = record.get("references") or []
    loras = [(lora["path"], lora["sha256"], lora["weight"]) for lora in (record.get("batch") or {}).get("loras", [])]
    return Job.from_task(record["params"], guidance=(record.get("batch") or {}).get("guidance"),
                         references=[r["path"] for r in refs], reference_hashes=[r["sha256"] for r in refs],
                         loras=loras)


def _pipeline_engine(model: str, dtype: str) -> Engine:
    try:
        from flowgen.engine.cards import resolve_model

        return PipelineEngine(resolve_model(model), dtype)
    except ImportError:  # pragma: no cover - engine without cards
        return PipelineEngine(model, dtype)
