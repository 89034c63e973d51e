"""Reading and writing `.safetensors` files one tensor (or one slice of a tensor) at a time.

The format is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets) and the raw
row-major data. We parse it ourselves and memory-map the data because safetensors' numpy backend cannot
return bfloat16, the dtype most published checkpoints use; a memory map also lets every device read just
its own shard of a tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from jaxlm.core.config import ConfigError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 << 20


class SafetensorsDir:
    """The tensors of a Hugging Face checkpoint directory: `model.safetensors`, or the shards listed in
    `model.safetensors.index.json`."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not files:
            raise ConfigError(f"{directory} has no *.safetensors files; save the model with "
                              f"save_pretrained(safe_serialization=True)")
        self.entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        for name in files:
            self._read_header(os.path.join(directory, name))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.entries))
            if missing:
                raise ConfigError(f"{INDEX_FILE} lists tensors that no shard holds: {few(missing)}")

    def _read_header(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is listed in {INDEX_FILE} but does not exist")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise ConfigError(f"{path} is not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ConfigError(f"{path} is not a safetensors file (header is not JSON)") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in DTYPES:
                raise ConfigError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
            begin, end = info["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                raise ConfigError(f"{path}: tensor {name} is truncated or its offsets are wrong; re-download the file")
            self.entries[name] = (path, dtype, shape, 8 + n + begin)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def nbytes(self, name: str) -> int:
        _, dtype, shape, _ = self.entries[name]
        return math.prod(shape) * dtype.itemsize

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """The tensor, or the block `index` (basic slices) of it, read from disk into a new array."""
        path, dtype, shape, offset = self.entries[name]
        if not math.prod(shape):
            return np.zeros(shape, dtype)
        mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return np.array(mapped[index])


def write(directory: str, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
          produce: Callable[[str], np.ndarray], max_shard_bytes: int = 5 << 30,
          progress: Callable[[Iterable], Iterable] = lambda x: x) -> list[str]:
    """Writes `tensors` (name, shape, dtype) into `directory`, calling `produce(name)` for each one in turn, so
    that only one tensor is in memory at a time. Above `max_shard_bytes` the tensors are split into
    `model-0000K-of-0000N.safetensors` files with a `model.safetensors.index.json`, like `save_pretrained`.
    Each file is written to a temporary name and renamed when complete. Returns the file names."""
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t[1]) * np.dtype(t[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    pending = progress([(file, t) for file, shard in zip(names, shards) for t in shard])
    pending = iter(pending)
    for file, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        path = os.path.join(directory, file)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, dtype in shard:
                next(pending)
                array = np.ascontiguousarray(produce(name), dtype=dtype)
                if array.shape != tuple(shape):
                    raise AssertionError(f"{name}: produced {array.shape}, planned {shape}")
                f.write(array.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    if len(shards) > 1:
        total = sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in tensors)
        weight_map = {name: file for file, shard in zip(names, shards) for name, _, _ in shard}
        tmp = os.path.join(directory, f"{INDEX_FILE}.tmp.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        os.replace(tmp, os.path.join(directory, INDEX_FILE))
    return names


def few(names: list[str], n: int = 6) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
