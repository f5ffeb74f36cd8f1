"""Where a task's `lora[].model` lives: a local .safetensors path, or a name in the LoRA folder.

    lora_path("/data/brand.safetensors")      # an absolute path (or ~/...), used as it is
    lora_path("brand")                        # $FLOWGEN_LORA_DIR/brand.safetensors (or .../brand)
    lora_path("styles/ink.safetensors")       # a relative name: inside the LoRA folder only
    lora_path("civitai:123@456")              # an AIR-like id: $FLOWGEN_LORA_DIR/civitai_123_456.safetensors

JAX-free and cheap: `flowgen validate` / `plan` resolve names, read the files' tensor names
(`checked_lora_path`) and hash them without the engine.
Relative names never leave the LoRA folder (no `..`), so a recipe cannot point at arbitrary files
by a relative name; absolute paths are the user's explicit choice.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from flowgen.engine.errors import EngineInputError
from flowgen.errors import FlowgenError

LORA_DIR_ENV = "FLOWGEN_LORA_DIR"
DEFAULT_LORA_DIR = "~/.cache/flowgen/loras"
SUFFIX = ".safetensors"
# `source:model@version` (Runware AIR style, e.g. civitai:123@456); version optional.
_AIR = re.compile(r"^([a-z][a-z0-9]*):([A-Za-z0-9_-]+)(?:@([A-Za-z0-9_-]+))?$")


def lora_dir() -> Path:
    """The LoRA folder: $FLOWGEN_LORA_DIR, else ~/.cache/flowgen/loras."""
    return Path(os.environ.get(LORA_DIR_ENV) or DEFAULT_LORA_DIR).expanduser()


def air_file_name(model: str) -> str | None:
    """`civitai:123@456` -> `civitai_123_456.safetensors` (None when `model` is not an AIR-like id)."""
    match = _AIR.match(model)
    if not match:
        return None
    return "_".join(part for part in match.groups() if part) + SUFFIX


def checked_lora_path(model: str, where: str = "lora.model") -> Path:
    """lora_path, then the file's tensor names (header only): a file that is not a safetensors LoRA
    flowgen reads is an EngineInputError now, not a failed batch later. (Sizes are checked when loaded.)"""
    path = lora_path(model, where)
    stat = path.stat()
    problem = _file_problem(str(path), stat.st_size, stat.st_mtime_ns)
    if problem:
        raise EngineInputError(f"{where}: {problem}")
    return path


@functools.lru_cache(maxsize=256)
def _file_problem(path: str, size: int, mtime_ns: int) -> str | None:
    """Why a LoRA file cannot be read (None: it can), remembered per file version."""
    from flowgen.engine.lora.files import unknown_tensors, unknown_tensors_message

    try:
        unknown = unknown_tensors(path)
    except FlowgenError as err:
        return str(err)
    return unknown_tensors_message(Path(path), unknown) if unknown else None


def lora_path(model: str, where: str = "lora.model") -> Path:
    """The .safetensors file `model` names; EngineInputError (one line naming `where` and the file) if none."""
    text = model.strip()
    if not text:
        raise EngineInputError(f"{where}: empty LoRA model name")
    expanded = Path(text).expanduser()
    if expanded.is_absolute():
        candidates = [expanded]
        shown = str(expanded)
    else:
        folder = lora_dir()
        name = air_file_name(text) or text
        if ".." in Path(name).parts:
            raise EngineInputError(
                f"{where}: {text!r} may not contain '..'; give an absolute path for a file outside "
                f"the LoRA folder ({folder})"
            )
        candidates = [folder / name] if name.endswith(SUFFIX) else [folder / (name + SUFFIX), folder / name]
        shown = f"{candidates[0]} (LoRA folder ${LORA_DIR_ENV} = {folder})"
    for candidate in candidates:
        if candidate.is_file():
            if candidate.suffix != SUFFIX:
                raise EngineInputError(f"{where}: {candidate} is not a {SUFFIX} file (only safetensors LoRAs are read)")
            return candidate
    if candidates[0].is_dir():
        raise EngineInputError(f"{where}: {candidates[0]} is a folder; name the LoRA's {SUFFIX} file")
    raise EngineInputError(f"{where}: LoRA file not found: {shown}")
