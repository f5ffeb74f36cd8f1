"""Files a run writes or removes stay inside its output folder, symlinks included.

The planner refuses names with `..` or absolute paths, but a folder inside OUT may be a symlink to
anywhere; writing (or deleting) through it would touch files outside OUT. Every such path is checked
with its folder resolved, just before the file is written or removed. The file itself may be a
symlink: os.replace and unlink act on the link, not on what it points to.
"""

from __future__ import annotations

import os


def outside_reason(out_dir: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """None when `path`'s folder, every symlink resolved, is `out_dir` (resolved too) or below it;
    else a one-line reason naming both."""
    root = os.path.realpath(out_dir)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if folder == root or folder.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return f"{path} is outside the output folder {out_dir} (its folder resolves to {folder}, through a symlink)"
