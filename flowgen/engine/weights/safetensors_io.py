"""Lazy, streaming access to safetensors checkpoints: one file, or a folder of shards with an index.

We parse the safetensors header ourselves and memory-map tensor bytes with numpy, because the
`safetensors` numpy backend cannot return bfloat16 (numpy has no bf16; ml_dtypes does). Nothing is
read until a tensor is asked for, so a loader that converts one tensor at a time keeps host memory
near one copy of the parameters.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from flowgen.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class TensorInfo:
    """Where one tensor lives: file, byte range, dtype and shape."""

    __slots__ = ("file", "begin", "end", "dtype", "shape")

    def __init__(self, file: Path, begin: int, end: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.file, self.begin, self.end, self.dtype, self.shape = file, begin, end, dtype, shape


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one .safetensors header. Raises CheckpointError naming the file if it is not one."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file is shorter than a safetensors header")
            (size,) = struct.unpack("<Q", raw)
            if size <= 0 or size > _MAX_HEADER:
                raise ValueError("header size is implausible")
            header = json.loads(f.read(size))
            f.seek(0, 2)
            file_size = f.tell()
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not a safetensors checkpoint ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors checkpoint (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + size
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has an unreadable header entry") from None
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or data_start + end > file_size:
            raise CheckpointError(f"{file}: tensor {name!r} is truncated or corrupt")
        tensors[name] = TensorInfo(file, data_start + begin, data_start + end, dtype, shape)
    return tensors, metadata


class LazyTensors(Mapping):
    """A read-only mapping name -> numpy array over one or more safetensors files.

    Arrays are memory-mapped views (read-only); copy or convert them before keeping them.
    """

    def __init__(self, infos: dict[str, TensorInfo], source: Path):
        self._infos = infos
        self.source = source

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._infos[name]
        count = int(np.prod(info.shape, dtype=np.int64))
        flat = np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.begin, shape=(count,))
        return flat.reshape(info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self._infos[name].dtype

    def file_of(self, name: str) -> Path:
        return self._infos[name].file


def open_safetensors(path: str | Path) -> LazyTensors:
    """Open a .safetensors file, a sharded `*.safetensors.index.json`, or a folder holding either.

    In a folder, an index file wins; otherwise every `*.safetensors` in it is read (a key present in
    two files is an error).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: more than one safetensors index ({', '.join(i.name for i in indexes)})")
        if indexes:
            return _open_index(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files in this folder")
        return _open_files(files, path)
    if path.name.endswith(".index.json"):
        return _open_index(path)
    return _open_files([path], path)


def _open_files(files: list[Path], source: Path) -> LazyTensors:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        tensors, _ = read_header(file)
        for name, info in tensors.items():
            if name in infos:
                raise CheckpointError(f"{file}: tensor {name!r} also appears in {infos[name].file.name}")
            infos[name] = info
    return LazyTensors(infos, source)


def _open_index(index_file: Path) -> LazyTensors:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index_file}: not a safetensors index (needs a 'weight_map' object)") from None
    infos: dict[str, TensorInfo] = {}
    headers: dict[str, dict[str, TensorInfo]] = {}
    for name, shard in weight_map.items():
        shard_file = index_file.parent / shard
        if shard not in headers:
            if not shard_file.is_file():
                raise CheckpointError(f"{index_file}: shard {shard} is missing")
            headers[shard] = read_header(shard_file)[0]
        if name not in headers[shard]:
            raise CheckpointError(f"{shard_file}: tensor {name!r} listed in the index is not in the shard")
        infos[name] = headers[shard][name]
    return LazyTensors(infos, index_file)
