"""`flowgen prune OUT_DIR [--recipe RECIPE] [--yes]`: remove the results the recipe no longer holds.

A result is removed from the recipe when its item is gone (a dataset row deleted, a matrix value
dropped, numberResults lowered): the plan's diff calls it `removed` (flowgen.plan.diff). Items an
incremental dataset's watermark leaves to earlier runs are still the recipe's and stay.
Without --yes it only lists them. With --yes it deletes their files first, then their manifest rows
(results, deliveries, delivery attempts, expirations) in one transaction together with a record of
the prune, so a crash in between leaves rows whose files are gone: a second prune finishes the job.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from flowgen.errors import FlowgenError
from flowgen.plan.from_recipe import plan_recipe
from flowgen.run.executor import new_run_id
from flowgen.run.lock import RunLock
from flowgen.run.manifest import Manifest, load_watermarks
from flowgen.run.merge import fold_shards
from flowgen.run.output_paths import outside_reason

SHOW = 50  # results listed one per line; beyond that, a count


def prune_command(out_dir: str, recipe: str | None, yes: bool) -> None:
    """List (or with `yes` remove) the results of OUT_DIR that RECIPE (default: the last run's) no longer holds."""
    fold_shards(out_dir)  # what shard runs recorded (flowgen.run.merge); running shards hold the lock below
    with Manifest(out_dir, create=False) as manifest:  # no manifest here: a user error
        path, overrides = _recipe_to_compare(out_dir, recipe, manifest.last_recipe())
    plan = plan_recipe(path, out_dir, overrides, watermarks=load_watermarks)
    with RunLock(out_dir, "prune-" + new_run_id()), Manifest(out_dir, create=False) as manifest:
        removed = plan.against(manifest.index(), verify_files=False).diff.removed
        records = [manifest.get(*rid) or {"item_id": rid[0], "result_index": rid[1]} for rid in removed]
        kept: dict[tuple[str, int], str] = {}  # result -> why its file was left in place
        if yes and records:
            for record in records:
                reason = _remove_file(manifest.out_dir, record)
                if reason:
                    kept[(record["item_id"], record["result_index"])] = reason
            manifest.remove_results(
                removed,
                str(path),
                [
                    [r["item_id"], r["result_index"], r.get("item_key"), (r.get("output") or {}).get("path")]
                    for r in records
                ],
            )
            manifest.export_jsonl()
        verb = "removed" if yes else "would remove"
        for number, record in enumerate(records):
            reason = kept.get((record["item_id"], record["result_index"]))
            if reason:  # said always: a file left in place is never reported as removed
                click.echo(f"removed the row of {_describe(record)}; its file was left in place: {reason}")
            elif number < SHOW:
                click.echo(f"{verb} {_describe(record)}")
        if len(records) > SHOW:
            click.echo(f"... and {len(records) - SHOW} more")
    shown = f"recipe {plan.recipe_name} ({path})"
    if not records:
        click.echo(f"{out_dir}: nothing to prune: every result in the manifest is in {shown}")
    elif yes:
        click.echo(
            f"{out_dir}: {len(records)} result(s) no longer in {shown} removed: their manifest rows and "
            + (
                f"{len(records) - len(kept)} of their files ({len(kept)} left in place, listed above)"
                if kept
                else "their files"
            )
        )
    else:
        command = ["flowgen", "prune", out_dir, "--yes"] + (["--recipe", recipe] if recipe is not None else [])
        click.echo(
            f"{out_dir}: {len(records)} result(s) no longer in {shown}; "
            f"`{shlex.join(command)}` removes their files and manifest rows"
        )


def _recipe_to_compare(out_dir: str, given: str | None, last: dict[str, Any] | None) -> tuple[str, list[str]]:
    """(recipe path, --set overrides): --recipe as given, else what the last run used."""
    if given is not None:
        return given, []
    if not last or not last.get("path"):
        raise FlowgenError(f"{out_dir}: no run here recorded its recipe; name it with --recipe RECIPE")
    if not Path(last["path"]).is_file():
        raise FlowgenError(
            f"{out_dir}: the last run's recipe {last['path']} is not there any more; "
            "name the recipe with --recipe RECIPE"
        )
    return last["path"], list(last.get("overrides") or ())


def _describe(record: dict[str, Any]) -> str:
    path = (record.get("output") or {}).get("path")
    return (
        f"{record['item_id']}#{record['result_index']} {record.get('item_key') or ''}" + (f" ({path})" if path else "")
    ).rstrip()


def _remove_file(out_dir: Path, record: dict[str, Any]) -> str | None:
    """Delete a result's file, only ever inside the output folder; returns why it was left in place
    (its folder resolves outside OUT_DIR through a symlink, or it cannot be removed), else None."""
    path = (record.get("output") or {}).get("path")
    if not path:
        return None
    target = out_dir / path
    outside = outside_reason(out_dir, target)
    if outside:
        return outside
    try:
        if target.is_symlink() or target.is_file():
            target.unlink()  # a symlink itself is removed, never what it points to
    except OSError as err:
        return f"cannot remove {target}: {err.strerror or err}"
    return None
