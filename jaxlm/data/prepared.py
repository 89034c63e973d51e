"""Reading a folder written by `jaxlm data prepare`: manifest, tokenizer check, documents by index."""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import numpy as np

from jaxlm.core.config import ConfigError
from jaxlm.data import shards, tokenizer as tokenizer_lib
from jaxlm.data.packing import DocStore


@dataclasses.dataclass
class Prepared:
    path: str
    manifest: dict
    source: grain.sources.ArrayRecordDataSource
    lengths: np.ndarray  # (num_docs,) tokens per document, in record order
    tokenizer_path: str

    def docs(self, indices: np.ndarray) -> DocStore:
        return DocStore(self.source, indices, self.lengths[indices])


def open_prepared(path: str) -> Prepared:
    path = os.path.abspath(os.path.expanduser(path))
    manifest_path = os.path.join(path, "manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"data.prepared={path} has no manifest.json: run `jaxlm data prepare ... --out {path}` "
                          "(a missing manifest means preparation did not finish)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{manifest_path} is not valid JSON ({e}); prepare the data again") from None
    files = [os.path.join(path, s["file"]) for s in manifest["shards"]]
    missing = [f for f in files if not shards.is_complete(f)]
    if missing:
        raise ConfigError(f"data.prepared={path} lacks shard {missing[0]}; prepare the data again")
    lengths = np.concatenate([np.load(shards.lengths_path(f)) for f in files]) if files else np.zeros(0, np.int64)
    if len(lengths) != manifest["documents"]:
        raise ConfigError(f"data.prepared={path}: shards hold {len(lengths)} documents, the manifest says "
                          f"{manifest['documents']}; prepare the data again")
    source = grain.sources.ArrayRecordDataSource(files)
    return Prepared(path, manifest, source, lengths, os.path.join(path, manifest["tokenizer"]["file"]))


def check_tokenizer(datasets: list[Prepared], given: str) -> str:
    """The tokenizer to train with: `given` (data.tokenizer) or the prepared one. Every dataset must have
    been tokenized with it, checked by file hash, or token ids would mean different things."""
    path = given or datasets[0].tokenizer_path
    expected = tokenizer_lib.file_hash(path) if os.path.isfile(path) else None
    for d in datasets:
        if d.manifest["tokenizer"]["hash"] != expected:
            raise ConfigError(
                f"data.prepared={d.path} was tokenized with {d.manifest['tokenizer']['file']} (sha256 "
                f"{d.manifest['tokenizer']['hash']}), but the training tokenizer {path} has sha256 {expected}; "
                f"set data.tokenizer={d.tokenizer_path} or prepare the data again with tokenizer={path}"
            )
    return path


def split(num_docs: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Every k-th document is held out, as for raw sources (`corpus.split`)."""
    idx = np.arange(num_docs)
    if eval_fraction <= 0 or num_docs < 2:
        return idx, idx[:0]
    k = max(2, round(1 / eval_fraction))
    return idx[idx % k != 0], idx[idx % k == 0]
