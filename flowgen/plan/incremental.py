"""Incremental datasets: plan only the rows (files) new since the last successful run.

A dataset with `incremental: true` has a watermark in its output folder's manifest, written at the
end of each successful run: what the dataset held then.

- images datasets (files): relative path -> (mtime_ns, size, sha256). A file is seen when its path
  and content hash are recorded; a file whose mtime and size are as recorded is not read again.
  A file whose content changed counts as new.
- csv / jsonl / values datasets (rows): the row keys (the dataset's `key:`, else its first
  column). A row whose key is recorded is seen, even if its other cells changed.

An item is planned when at least one of its incremental rows is new (an item that draws on no
incremental dataset is always planned). The items left out are still the recipe's: their ids go in
`retained_item_ids`, so their earlier results are not "removed". The watermarks reach this module as
plain data (the run layer reads them from the manifest; the plan layer never imports it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowgen.plan.hashing import sha256_file
from flowgen.plan.seeds import item_id_for

# dataset -> {"kind": "keys" | "files", "entries": [...] | {path: [mtime_ns, size, sha256]}, "recorded_at", "run_id"}
Watermarks = dict[str, dict[str, Any]]
WatermarkReader = Callable[[Path], Watermarks]


@dataclass(frozen=True)
class DatasetSelection:
    """What one incremental dataset's watermark selects now (what `flowgen plan` shows)."""

    dataset: str
    kind: str  # "keys" or "files"
    rows: int  # rows the dataset holds now
    new_rows: int  # ... of them not in the watermark: the ones planned
    watermark_rows: int  # entries the watermark holds (0: none recorded yet)
    recorded_at: float | None  # when the watermark was written (None: never)
    run_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "kind": self.kind,
            "rows": self.rows,
            "new_rows": self.new_rows,
            "watermark_rows": self.watermark_rows,
            "recorded_at": self.recorded_at,
            "run_id": self.run_id,
        }


@dataclass
class Selection:
    """The items to plan, the ids of those the watermark leaves out, and the watermark to record next."""

    items: list
    retained_item_ids: set[str] = field(default_factory=set)
    datasets: list[DatasetSelection] = field(default_factory=list)
    next_watermarks: Watermarks = field(default_factory=dict)  # recorded by a successful run

    def increment(self) -> Increment:
        """What the plan keeps of it (everything but the items)."""
        return Increment(tuple(self.datasets), frozenset(self.retained_item_ids), self.next_watermarks)


@dataclass(frozen=True)
class Increment:
    """What a plan's incremental datasets' watermarks select (Plan.incremental): each dataset's
    selection (what `flowgen plan` shows), the items left to earlier runs, and the watermarks a
    successful run records."""

    datasets: tuple[DatasetSelection, ...]
    retained_item_ids: frozenset[str]
    next_watermarks: Watermarks


def incremental_datasets(recipe: Any) -> list[str]:
    """Names of the recipe's datasets marked `incremental: true` that the matrix draws on."""
    used = set(recipe.dataset_variables().values())
    return [name for name, spec in recipe.datasets.items() if spec.incremental and name in used]


def select_new(recipe: Any, items: Sequence[Any], watermarks: Watermarks) -> Selection:
    """Keep the items with at least one row new to its incremental dataset's watermark."""
    names = incremental_datasets(recipe)
    if not names:
        return Selection(list(items))
    seen: dict[str, set[str]] = {}  # dataset -> row keys the watermark covers
    selection = Selection([])
    for name in names:
        spec = recipe.datasets[name]
        recorded = watermarks.get(name) or {}
        kind = "files" if spec.source == "images" else "keys"
        if recorded.get("kind") != kind:
            recorded = {}  # the dataset changed kind since: nothing of it was seen
        rows = recipe.dataset_rows(name)
        if kind == "files":
            entries, seen[name] = _files_now(rows, recipe.recipe_dir, recorded.get("entries") or {})
            merged: dict[str, list] | list[str] = {**(recorded.get("entries") or {}), **entries}  # keys: a sorted list
        else:
            before = set(recorded.get("entries") or [])
            seen[name] = {row.key for row in rows if row.key in before}
            merged = sorted(before | {row.key for row in rows})
        selection.next_watermarks[name] = {"kind": kind, "entries": merged}
        selection.datasets.append(
            DatasetSelection(
                name,
                kind,
                rows=len(rows),
                new_rows=len(rows) - len(seen[name]),
                watermark_rows=len(recorded.get("entries") or ()),
                recorded_at=recorded.get("recorded_at"),
                run_id=recorded.get("run_id"),
            )
        )
    variables = {var: dataset for var, dataset in recipe.dataset_variables().items() if dataset in seen}
    for item in items:
        row_keys = _row_keys(item.key, variables)
        if row_keys and all(key in seen[variables[var]] for var, key in row_keys.items()):
            selection.retained_item_ids.add(item_id_for(recipe.name, item.key))
        else:
            selection.items.append(item)
    return selection


def _files_now(rows: Sequence[Any], recipe_dir: Path, recorded: dict[str, list]) -> tuple[dict[str, list], set[str]]:
    """(path -> [mtime_ns, size, sha256] for every file now, row keys of the files already seen)."""
    entries: dict[str, list] = {}
    seen: set[str] = set()
    for row in rows:
        relative = str(row.data["path"])
        path = Path(relative) if os.path.isabs(relative) else recipe_dir / relative
        stat = path.stat()
        before = recorded.get(relative)
        if before and before[0] == stat.st_mtime_ns and before[1] == stat.st_size:
            digest = before[2]  # untouched since it was recorded: not read again
        else:
            digest = sha256_file(path)
        entries[relative] = [stat.st_mtime_ns, stat.st_size, digest]
        if before and before[2] == digest:
            seen.add(row.key)
    return entries, seen


def _row_keys(item_key: str, variables: dict[str, str]) -> dict[str, str]:
    """variable -> row key, for the incremental variables of an item key "var=key|var=key"
    (row keys never hold '|', so the parts split cleanly)."""
    found = {}
    for part in item_key.split("|") if item_key else ():
        var, _, key = part.partition("=")
        if var in variables:
            found[var] = key
    return found
