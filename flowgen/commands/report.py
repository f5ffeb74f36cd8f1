"""`flowgen report OUT_DIR [-o FILE]`: write the folder's HTML contact sheet and print its path."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import click

from flowgen.errors import FlowgenError


def report_command(out_dir: str, output: str | None) -> Path:
    """Render OUT_DIR's report to OUTPUT (default OUT_DIR/report.html) and print where it is."""
    from flowgen.report import REPORT_NAME, write_report
    from flowgen.run.manifest import manifest_path
    from flowgen.run.merge import fold_shards

    if not Path(out_dir).is_dir():
        raise FlowgenError(f"{out_dir}: no such output folder (flowgen report needs a folder a run wrote)")
    target = Path(output) if output else Path(out_dir) / REPORT_NAME
    if target.is_dir():
        raise FlowgenError(f"-o {output}: is a folder; give the report's file name, e.g. {target / REPORT_NAME}")
    try:
        fold_shards(out_dir)  # what shard runs recorded (flowgen.run.merge)
        write_report(out_dir, target)
    except sqlite3.DatabaseError as err:
        raise FlowgenError(f"{manifest_path(out_dir)}: not a readable flowgen manifest ({err})") from None
    except OSError as err:  # the manifest was read; only writing the report failed, and nothing was replaced
        raise FlowgenError(f"{target}: cannot write the report ({err.strerror or err})") from None
    click.echo(str(target))
    return target
