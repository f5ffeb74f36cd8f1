"""Where a model card's weights are on disk: the Hugging Face cache, the flowgen cache (tiny model),
local pipeline folders — and cheap file digests for manifests.

Nothing here downloads unless asked (`hf_snapshot(..., download=True)`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from flowgen.errors import CheckpointError

_FULL_HASH_LIMIT = 16 * 1024 * 1024  # files up to this size are hashed whole
_SAMPLE = 64 * 1024  # bytes hashed at two places of a large file, besides its header


def flowgen_cache_dir() -> Path:
    """$FLOWGEN_CACHE, else $XDG_CACHE_HOME/flowgen, else ~/.cache/flowgen."""
    if os.environ.get("FLOWGEN_CACHE"):
        return Path(os.environ["FLOWGEN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "flowgen"


def tiny_folder(name: str, seed: int) -> Path:
    """The tiny model's folder in the flowgen cache, written atomically on first use.

    The folder name carries a hash of the tiny model's spec, so a changed spec never reuses stale
    files. Writers fill a private temporary folder and rename it into place; when several processes
    race, one rename wins and the others discard their copy.
    """
    from flowgen.engine.catalog import tiny_model

    spec = tiny_model.identity(seed)["spec_sha256"][:12]
    root = flowgen_cache_dir() / "models"
    final = root / f"{name}-{spec}"
    if (final / "model_index.json").is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    except OSError as err:
        raise CheckpointError(f"{root}: cannot create the model cache ({err.strerror}); set FLOWGEN_CACHE") from None
    try:
        tiny_model.write_tiny_model(staging, seed=seed)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the finished folder is an ordinary cache entry
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / "model_index.json").is_file():  # not a concurrent writer that won
                raise
    except OSError as err:
        raise CheckpointError(f"{final}: cannot write the tiny model ({err})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def download_hint(repo: str, gated: bool) -> str:
    token = " (gated: accept the licence on huggingface.co and set HF_TOKEN first)" if gated else ""
    return f"download them with `hf download {repo}` (or `huggingface-cli download {repo}`){token}"


def hf_snapshot(repo: str, *, gated: bool, label: str, download: bool = False) -> Path:
    """The complete cached snapshot of `repo` (offline lookup), or the downloaded one with `download=True`.

    `label` names the model in errors. Raises CheckpointError saying how to get missing weights.
    """
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    hint = download_hint(repo, gated)
    if download:
        try:
            folder = Path(huggingface_hub.snapshot_download(repo))
        except hf_errors.GatedRepoError:
            raise CheckpointError(
                f"model {label}: {repo} is gated; accept its licence on huggingface.co and set "
                "HF_TOKEN (or run `hf auth login`)"
            ) from None
        except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, OSError, ValueError) as err:
            raise CheckpointError(f"model {label}: downloading {repo} failed ({one_line(err)})") from None
        return check_pipeline_folder(folder, label=label, hint=hint)
    cached: Path | None
    try:
        cached = Path(huggingface_hub.snapshot_download(repo, local_files_only=True))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.HfHubHTTPError, OSError, ValueError):
        cached = _cached_snapshot_any_case(repo)
    if cached is None:
        raise CheckpointError(
            f"model {label}: weights not found in the Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}); {hint}"
        )
    return check_pipeline_folder(cached, label=label, hint=hint)


def _cached_snapshot_any_case(repo: str) -> Path | None:
    """A cached snapshot of `repo` whose folder differs only in case (HF repo ids are case-insensitive,
    the cache's folder names are not: `hf download org/Name` and `org/name` land in different places)."""
    from huggingface_hub import constants

    wanted = ("models--" + repo.replace("/", "--")).lower()
    try:
        candidates = [d for d in Path(constants.HF_HUB_CACHE).iterdir() if d.name.lower() == wanted]
    except OSError:
        return None
    for repo_dir in candidates:
        ref = repo_dir / "refs" / "main"
        if ref.is_file() and (repo_dir / "snapshots" / ref.read_text().strip()).is_dir():
            return repo_dir / "snapshots" / ref.read_text().strip()
        snapshots = sorted((repo_dir / "snapshots").glob("*/model_index.json"), key=lambda p: p.stat().st_mtime)
        if snapshots:
            return snapshots[-1].parent
    return None


def check_pipeline_folder(folder: Path, *, label: str, hint: str) -> Path:
    """`folder` if it holds a complete diffusers pipeline, else a CheckpointError saying what is missing."""
    if not folder.is_dir():
        raise CheckpointError(f"model {label}: weights folder {folder} does not exist; {hint}")
    index = read_json(folder / "model_index.json", what="model_index.json")
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    missing = [
        c
        for c in components
        if c != "scheduler"
        and not any((folder / c).glob("*.safetensors*"))
        and not (folder / c / "tokenizer.json").is_file()
        and not (folder / c / "flowgen-orbax.json").is_file()  # converted by `flowgen convert` (orbax_checkpoint.py)
    ]
    if missing:
        raise CheckpointError(f"model {label}: {folder} is incomplete (no weights in {', '.join(missing)}); {hint}")
    return folder


def file_digest(file: Path) -> str:
    """A cheap, content-sensitive digest of one weights-folder file (see ModelCard.weights_identity)."""
    size = file.stat().st_size
    if size <= _FULL_HASH_LIMIT:
        return "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()
    blob = file.resolve().name  # the HF cache names LFS blobs by their SHA-256
    if file.is_symlink() and len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return "sha256:" + blob
    digest = hashlib.sha256(str(size).encode())
    with open(file, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if file.suffix == ".safetensors" else 0
        digest.update(head + f.read(min(header_len, size - 8)))
        for offset in (size // 2, max(size - _SAMPLE, 0)):
            f.seek(offset)
            digest.update(f.read(_SAMPLE))
    return "sampled-sha256:" + digest.hexdigest()


def read_json(path: Path, *, what: str) -> dict:
    """A JSON object from a pipeline folder; CheckpointError naming the folder if absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent}: not a diffusers pipeline folder (no {what}); expected the layout "
            "of a Hugging Face FLUX.2 [klein] repo"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read {what} ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
