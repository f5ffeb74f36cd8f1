"""Stable identities: item ids and per-result seeds.

Both derive from the item's key (built by the recipe layer from dataset keys and matrix values,
never from a row position), so adding, removing or reordering rows changes no other item.

    item_id = sha256("flowgen-item\\0" + recipe_name + "\\0" + key).hexdigest()[:12]
    seed    = int.from_bytes(sha256("flowgen-seed\\0" + recipe_seed + "\\0" + key + "\\0" + i)[:8], "big")
              & (2**63 - 1)                          # the spec's range is 0 .. 2**63-1
    explicit task.seed s: result i uses (s + i) mod 2**63 — Runware gives each of numberResults a
    different seed; consecutive seeds are the convention users expect from a fixed seed.
"""

from __future__ import annotations

import hashlib

from flowgen.recipe.spec import SEED_MAX  # spec: seed min 0, max 9223372036854775807 (2**63 - 1)


def item_id_for(recipe_name: str, key: str) -> str:
    """Short stable id (12 hex digits) of an item: the recipe name and the item key, nothing else."""
    digest = hashlib.sha256(f"flowgen-item\0{recipe_name}\0{key}".encode()).hexdigest()
    return digest[:12]


def derive_seed(recipe_seed: int | None, key: str, result_index: int) -> int:
    """Seed of result `result_index` of the item `key`, independent of every other item."""
    material = f"flowgen-seed\0{recipe_seed or 0}\0{key}\0{result_index}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big") & SEED_MAX


def result_seed(task_seed: int | None, recipe_seed: int | None, key: str, result_index: int) -> int:
    """The seed actually used: task.seed + i when the task fixes a seed, else the derived one."""
    if task_seed is not None:
        return (int(task_seed) + result_index) % (SEED_MAX + 1)
    return derive_seed(recipe_seed, key, result_index)
