"""`flowgen merge OUT_DIR`: fold the manifests of shard runs into the folder's main manifest."""

from __future__ import annotations

import click

from flowgen.errors import FlowgenError
from flowgen.run.manifest import Manifest, manifest_path
from flowgen.run.merge import fold_shards
from flowgen.run.shards import shard_files


def merge_command(out_dir: str) -> None:
    """Fold OUT_DIR's shard manifests into its main one (idempotent), export manifest.jsonl, say what it did."""
    if not manifest_path(out_dir).exists() and not shard_files(out_dir):
        raise FlowgenError(
            f"{out_dir}: no flowgen manifest here (neither .flowgen/manifest.sqlite nor shard "
            "manifests in .flowgen/shards)"
        )
    folded = fold_shards(out_dir)
    with Manifest(out_dir, create=False) as manifest:
        manifest.export_jsonl()
        counts = manifest.counts()
    parts = [f"{counts.get(status, 0)} {status}" for status in ("ok", "failed")] + [
        f"{counts[s]} {s}" for s in ("skipped",) if counts.get(s)
    ]
    line = f"{out_dir}: folded {len(folded.folded)} shard(s)"
    if folded.running:
        line += f", and {len(folded.running)} still running as far as they got ({', '.join(folded.running)})"
    click.echo(f"{line}; the manifest holds {', '.join(parts)} (manifest.jsonl rewritten)")
    if folded.watermarks_moved:
        click.echo("  every shard completed: the incremental datasets' watermarks moved")


__all__ = ["merge_command"]
