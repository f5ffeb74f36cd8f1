"""Matrix expansion: cartesian product of variables, `zip:` groups, then `exclude:`, then `include:`.

Semantics follow GitHub Actions' strategy.matrix: exclude removes matching combinations; each
include entry extends every combination its matrix values match (adding new variables, never
overwriting matrix values), and becomes a new combination when it matches none.
A combination maps variable -> Row; its key is "var=rowkey|..." over variables sorted by name.
"""

from __future__ import annotations

import itertools
from typing import Any

from flowgen.recipe.datasets import Row, as_text

MAX_ITEMS = 100_000
RESERVED = ("name", "key", "slug", "result", "ext")

Combo = dict[str, Row]


def combo_key(combo: Combo) -> str:
    """The stable item key: sorted variables, each with its row's dataset key (never a position)."""
    return "|".join(f"{var}={combo[var].key}" for var in sorted(combo))


def keyed_combos(combos: list[Combo]) -> list[tuple[str, Combo]]:
    """(combo_key(combo), combo) for every combination; the variable order is sorted once per
    distinct set of variables, not once per combination."""
    orders: dict[tuple, list[tuple[str, str]]] = {}
    keyed = []
    for combo in combos:
        names = tuple(combo)
        order = orders.get(names)
        if order is None:
            order = orders[names] = [(var, f"{var}=") for var in sorted(combo)]
        keyed.append(("|".join([prefix + combo[var].key for var, prefix in order]), combo))
    return keyed


def factors(recipe: Any, problems: list[str]) -> list[list[Combo]]:
    """One list of partial combinations per matrix variable or zip group."""
    rows_of = recipe._rows
    result = []
    for var, source in recipe.matrix.items():
        result.append([{var: row} for row in _source_rows(var, source, rows_of, f"matrix.{var}", problems)])
    for index, group in enumerate(recipe.zip):
        columns = {var: _source_rows(var, source, rows_of, f"zip[{index}].{var}", problems) for var, source in group.items()}
        lengths = {var: len(rows) for var, rows in columns.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{var} has {n}" for var, n in lengths.items())
            problems.append(f"zip[{index}]: variables must have the same number of rows to be paired ({shown})")
            continue
        result.append([dict(zip(columns, paired)) for paired in zip(*columns.values())])
    return result


def source_rows(recipe: Any) -> dict[str, list[Row]]:
    """Variable -> its rows (dataset rows or inline values) for every matrix and zip variable."""
    sink: list[str] = []
    found = {var: _source_rows(var, src, recipe._rows, "", sink) for var, src in recipe.matrix.items()}
    for group in recipe.zip:
        found.update({var: _source_rows(var, src, recipe._rows, "", sink) for var, src in group.items()})
    return found


def _source_rows(var: str, source: Any, rows_of: dict, where: str, problems: list[str]) -> list[Row]:
    if isinstance(source, str):
        return rows_of.get(source) or []
    rows, seen = [], set()
    for index, value in enumerate(source):
        row = Row(as_text(value), value, f"{where}[{index}]")
        if row.key in seen:
            problems.append(f"{where}[{index}]: duplicate value {value!r}; matrix values must be unique")
        seen.add(row.key)
        rows.append(row)
    return rows


def expand_keyed_combos(recipe: Any) -> tuple[list[tuple[str, Combo]], list[str]]:
    """All (key, combination) pairs after product, zip, exclude and include; returns (pairs, problems)."""
    problems: list[str] = []
    groups = factors(recipe, problems)
    size = 1
    for group in groups:
        size *= len(group)
    if size > MAX_ITEMS:
        return [], [f"matrix: expands to {size} items; the limit is {MAX_ITEMS} (split the recipe or filter datasets)"]
    if groups:
        combos = [_joined(parts) for parts in itertools.product(*groups)]
    else:
        combos = [] if recipe.include else [{}]
    variables = list(recipe.matrix) + [var for group in recipe.zip for var in group]
    if recipe.exclude:
        combos = [c for c in combos if not any(matches(c, entry) for entry in recipe.exclude)]
    all_rows = source_rows(recipe)
    originals = len(combos)  # as in CI matrices, include entries match only the original combinations
    for index, entry in enumerate(recipe.include):
        combos = _apply_include(combos, originals, entry, set(variables), all_rows, f"include[{index}]", problems)
    keyed = keyed_combos(combos)
    if len({key for key, _ in keyed}) < len(keyed):
        seen: dict[str, int] = {}
        for key, _ in keyed:
            seen[key] = seen.get(key, 0) + 1
        problems += [f"matrix: {n} combinations share the key {key!r}; include entries must not repeat a combination" for key, n in seen.items() if n > 1]
    return keyed, problems


def _joined(parts: tuple[Combo, ...]) -> Combo:
    combo: Combo = {}
    for part in parts:
        combo.update(part)
    return combo


def matches(combo: Combo, entry: dict[str, Any]) -> bool:
    """True when every variable named in `entry` is present in `combo` and its row matches the pattern."""
    return all(var in combo and row_matches(combo[var], pattern) for var, pattern in entry.items())


def row_matches(row: Row, pattern: Any) -> bool:
    """A pattern matches a row by key (scalar), by columns (mapping, nested allowed) or any-of (list)."""
    if isinstance(pattern, list):
        return any(row_matches(row, p) for p in pattern)
    if isinstance(pattern, dict):
        return _data_matches(row.data, pattern)
    return row.key == as_text(pattern) or (not isinstance(row.data, dict) and as_text(row.data) == as_text(pattern))


def _data_matches(data: Any, pattern: Any) -> bool:
    if isinstance(pattern, dict):
        return isinstance(data, dict) and all(k in data and _data_matches(data[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        return any(_data_matches(data, p) for p in pattern)
    return as_text(data) == as_text(pattern)


def _apply_include(
    combos: list[Combo], originals: int, entry: dict, variables: set[str], all_rows: dict, where: str, problems: list[str]
) -> list[Combo]:
    matrix_part = {var: pattern for var, pattern in entry.items() if var in variables}
    extras: dict[str, Row] = {}
    for var, value in entry.items():
        if var in variables:
            continue
        if isinstance(value, (dict, list)) or value is None:
            problems.append(f"{where}.{var}: a variable added by include must be a scalar, got {value!r}")
            continue
        extras[var] = Row(as_text(value), value, f"{where}.{var}")
    extended = False
    result = []
    for index, combo in enumerate(combos):
        if index < originals and matches(combo, matrix_part):
            combo = {**combo, **extras}  # added values may overwrite earlier added ones, never matrix values
            extended = True
        result.append(combo)
    if extended:
        return result
    new_combo = dict(extras)
    for var, pattern in matrix_part.items():
        row = _pick_row(var, pattern, all_rows.get(var, []), f"{where}.{var}", problems)
        if row is not None:
            new_combo[var] = row
    return result + [new_combo]


def _pick_row(var: str, pattern: Any, rows: list[Row], where: str, problems: list[str]) -> Row | None:
    """The one existing row an include pattern names; a scalar not among inline values is a new value."""
    found = [row for row in rows if row_matches(row, pattern)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        problems.append(f"{where}: {pattern!r} matches {len(found)} rows ({', '.join(r.key for r in found[:5])}); name exactly one")
        return None
    if not isinstance(pattern, (dict, list)) and not any(isinstance(r.data, dict) for r in rows):
        return Row(as_text(pattern), pattern, where)  # a new scalar value, as in CI matrices
    problems.append(f"{where}: no row matches {pattern!r}" + (f"; keys: {', '.join(r.key for r in rows[:8])}" if rows else ""))
    return None
