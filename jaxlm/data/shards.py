"""Tokenized documents in ArrayRecord shards, written atomically, read with random access.

A shard holds one record per document: its token ids (`<s> ... </s>`) as little-endian int32. Next to
it, `<shard>.lengths.npy` holds every record's length, so readers can lay out packed rows without
opening the records. Both are written to temporary names and renamed, lengths first: a shard that exists
under its final name is complete, whatever happened to the process that wrote it.
"""

from __future__ import annotations

import os

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

SHARD_SUFFIX = ".array_record"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}{SHARD_SUFFIX}"


def lengths_path(shard_path: str) -> str:
    return shard_path[: -len(SHARD_SUFFIX)] + ".lengths.npy"


def is_complete(shard_path: str) -> bool:
    return os.path.isfile(shard_path) and os.path.isfile(lengths_path(shard_path))


def write(path: str, docs: list[np.ndarray]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: cheap random access
    for tokens in docs:
        writer.write(np.asarray(tokens, "<i4").tobytes())
    writer.close()
    lengths_tmp = f"{lengths_path(path)}.tmp.{os.getpid()}.npy"
    np.save(lengths_tmp, np.asarray([len(d) for d in docs], np.int64))
    os.replace(lengths_tmp, lengths_path(path))
    os.replace(tmp, path)


def remove_partial(directory: str) -> int:
    """Deletes temporary files left by a killed writer; returns how many."""
    removed = 0
    for name in os.listdir(directory):
        if ".tmp." in name:
            os.remove(os.path.join(directory, name))
            removed += 1
    return removed


def decode(record: bytes) -> np.ndarray:
    return np.frombuffer(record, "<i4").astype(np.int32)
