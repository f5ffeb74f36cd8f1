"""Datasets: named tables of rows read from CSV, JSONL, an image glob, or inline values.

Every row gets a key from the dataset's `key` template (default: the first column; `{name}` for
images; the value itself for scalar lists). Keys identify rows in item keys, so they must be
unique: a duplicate is an error that names both rows.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowgen.limits import MAX_DATASET_BYTES, MAX_DEPTH, FileProblem, deeper_than, read_limited
from flowgen.recipe.schema import DatasetSpec
from flowgen.recipe.templates import TemplateProblem, render

_FORBIDDEN_IN_KEYS = ("|", "\n", "\r")
_TOO_DEEP = object()


@dataclass(frozen=True)
class Row:
    """One dataset row: its key, its data (a dict of columns, or a scalar) and where it came from."""

    key: str
    data: Any
    origin: str  # e.g. "line 3 of data/products.csv", for messages


def load_dataset(name: str, spec: DatasetSpec, recipe_dir: Path) -> tuple[list[Row], list[str]]:
    """Read, filter and key one dataset; returns (rows, problems)."""
    where = f"datasets.{name}"
    readers: dict[str, Callable[[Any, Path, str], tuple[list, list[str]]]] = {
        "csv": _read_csv,
        "jsonl": _read_jsonl,
        "images": _read_images,
        "values": _read_values,
    }
    records, problems = readers[spec.source](getattr(spec, spec.source), recipe_dir, where)
    if problems:
        return [], problems
    records, problems = _apply_filter(records, spec.filter, where)
    rows = []
    template = spec.key or ("{name}" if spec.source == "images" else None)
    for data, origin in records:
        key, problem = _row_key(data, template, where, origin)
        if problem:
            problems.append(problem)
        else:
            rows.append(Row(key, data, origin))
    problems += _duplicates(rows, where)
    return rows, problems


def _read_csv(relative: str, recipe_dir: Path, where: str) -> tuple[list, list[str]]:
    text, problem = _read_text(relative, recipe_dir, f"{where}.csv")
    if problem:
        return [], [problem]
    reader = csv.reader(io.StringIO(text, newline=""))  # not splitlines(): a quoted cell may hold a line break
    header = next(reader, None)
    if not header or not any(cell.strip() for cell in header):
        return [], [f"{where}.csv: {relative} has no header row"]
    header = [cell.strip() for cell in header]
    if len(set(header)) != len(header):
        return [], [f"{where}.csv: {relative} repeats a column name in its header: {', '.join(header)}"]
    records, problems = [], []
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            origin = f"line {reader.line_num} of {relative}"
            if len(cells) != len(header):
                problems.append(f"{where}.csv: {origin} has {len(cells)} cells, the header has {len(header)}")
                continue
            records.append((dict(zip(header, cells)), origin))
    except csv.Error as err:  # e.g. a cell over the csv module's field limit (128 KiB)
        problems.append(f"{where}.csv: line {reader.line_num} of {relative}: {err}")
    return records, problems


def _read_jsonl(relative: str, recipe_dir: Path, where: str) -> tuple[list, list[str]]:
    text, problem = _read_text(relative, recipe_dir, f"{where}.jsonl")
    if problem:
        return [], [problem]
    records, problems = [], []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        origin = f"line {number} of {relative}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}.jsonl: {origin} is not valid JSON ({err.msg}, column {err.colno})")
            continue
        except RecursionError:  # nested past the interpreter's limit, so deeper than MAX_DEPTH too
            data = _TOO_DEEP
        if data is _TOO_DEEP or deeper_than(data):
            problems.append(
                f"{where}.jsonl: {origin} nests deeper than {MAX_DEPTH} levels; rows are limited to {MAX_DEPTH}"
            )
            continue
        if not isinstance(data, dict):
            problems.append(f"{where}.jsonl: {origin} must be a JSON object, got {type(data).__name__}")
            continue
        records.append((data, origin))
    return records, problems


def _read_images(pattern: str, recipe_dir: Path, where: str) -> tuple[list, list[str]]:
    base = Path(pattern)
    if base.is_absolute():
        anchor, relative_pattern = Path(base.anchor), str(base.relative_to(base.anchor))
    else:
        anchor, relative_pattern = recipe_dir, pattern
    try:
        matches = sorted(p for p in anchor.glob(relative_pattern) if p.is_file())
    except (ValueError, NotImplementedError) as err:
        return [], [f"{where}.images: bad glob {pattern!r} ({err})"]
    if not matches:
        return [], [f"{where}.images: {pattern!r} matches no files (relative to {recipe_dir})"]
    records = []
    for path in matches:
        shown = path.relative_to(recipe_dir).as_posix() if path.is_relative_to(recipe_dir) else str(path)
        records.append(({"path": shown, "name": path.stem}, shown))
    return records, []


def _read_values(values: list, recipe_dir: Path, where: str) -> tuple[list, list[str]]:
    return [(value, f"values[{index}]") for index, value in enumerate(values)], []  # types checked by the schema


def _read_text(relative: str, recipe_dir: Path, where: str) -> tuple[str, str | None]:
    path = recipe_dir / relative
    try:
        return read_limited(path, MAX_DATASET_BYTES).decode("utf-8-sig"), None
    except FileNotFoundError:
        return "", f"{where}: file not found: {relative} (relative to {recipe_dir})"
    except FileProblem as problem:
        return "", f"{where}: {relative} {problem}" + (" for a dataset file" if problem.too_large else "")
    except UnicodeDecodeError as err:
        return "", f"{where}: {relative} is not UTF-8 text (byte {err.start})"


def _apply_filter(records: list, filters: dict | None, where: str) -> tuple[list, list[str]]:
    """Keep rows whose every filtered column equals the value (or one of the listed values), as text."""
    if not filters:
        return records, []
    columns = _columns(records)
    unknown = [c for c in filters if c not in columns]
    if unknown:
        return [], [f"{where}.filter: unknown column {unknown[0]!r}; columns: {', '.join(columns)}"]
    wanted = {c: {as_text(v) for v in (vs if isinstance(vs, list) else [vs])} for c, vs in filters.items()}

    def keep(data: Any) -> bool:
        row = data if isinstance(data, dict) else {"value": data}
        return all(as_text(row.get(c)) in allowed for c, allowed in wanted.items())

    return [r for r in records if keep(r[0])], []


def _columns(records: list) -> list[str]:
    columns: dict[str, None] = {}
    for data, _ in records:
        columns.update(dict.fromkeys(data if isinstance(data, dict) else ["value"]))
    return list(columns)


def _row_key(data: Any, template: str | None, where: str, origin: str) -> tuple[str, str | None]:
    context = data if isinstance(data, dict) else {"value": data}
    if template is None:
        key = next(iter(data.values()), "") if isinstance(data, dict) else data  # first column, or the value
    else:
        try:
            key = render(template, context)
        except TemplateProblem as problem:
            return "", f"{where}.key: {problem.message} ({origin}); columns: {', '.join(context)}"
    key = as_text(key)
    if not key.strip():
        return "", f"{where}.key: empty key for {origin}"
    if any(ch in key for ch in _FORBIDDEN_IN_KEYS):
        return "", f"{where}.key: key {key!r} of {origin} contains '|' or a line break, which item keys reserve"
    return key, None


def _duplicates(rows: list[Row], where: str) -> list[str]:
    seen: dict[str, list[str]] = {}
    for row in rows:
        seen.setdefault(row.key, []).append(row.origin)
    return [
        f"{where}: duplicate key {key!r} in {' and '.join(origins)}; set `key:` to a template that is unique per row"
        for key, origins in seen.items()
        if len(origins) > 1
    ]


def as_text(value: Any) -> str:
    """A cell value as text for keys and comparisons (1.0 -> "1", True -> "true", None -> "")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)
