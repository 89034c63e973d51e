"""The stages of `jaxlm data prepare` as pure functions of input blocks and hash partitions.

Every document has a stable id: its file's index in the sorted inputs (high bits) and its position in the
file (the byte offset of a JSONL record, or the ordinal of a .txt/.parquet document). Ids order documents
as the inputs do, whatever blocks, workers or engine read them, so every decision below ("keep the lowest
id") and the shards' order are the same for any execution.

    clean_block       read -> normalize -> filter -> pii -> exact key, MinHash signature   (per block)
    exact_map/reduce  (key, id) hash-partitioned by key; all but the lowest id of a key are dropped
    near_map/reduce   (band key, id) hash-partitioned by band key; candidate edges inside buckets, verified
                      against the signatures on disk
    cc_map/reduce     min-label propagation over the verified edges, partitioned by node, until stable
    keep_block        drops the duplicates, checks contamination against the broadcast eval n-grams
    write_shard       tokenizes a run of kept documents into one shard

Each block's outputs are files under `work/blocks/`, written under temporary names and renamed, its
stats file last: a block with stats is complete, so a re-run skips it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import time

import numpy as np

from jaxlm.core import atomic
from jaxlm.core.config import PrepareConfig
from jaxlm.data import readers, shards, tokenizer as tokenizer_lib
from jaxlm.data.prepare import filters, minhash, normalize, pii

ID_BITS = 40  # positions up to 1 TiB per file; up to 2^23 files


@dataclasses.dataclass(frozen=True)
class Block:
    index: int
    file: int
    path: str
    start: int = 0
    end: int = -1  # -1: to the end of the file

    @property
    def first_id(self) -> int:
        return (self.file << ID_BITS) | self.start


def plan(paths: list[str], block_bytes: int) -> list[Block]:
    """JSONL files in byte ranges of `block_bytes`; other formats, which cannot be entered mid-file, whole."""
    blocks = []
    for f, path in enumerate(paths):
        size = os.path.getsize(path)
        starts = range(0, size, block_bytes) if readers.splittable(path) and size > block_bytes else [0]
        for start in starts:
            end = start + block_bytes if len(starts) > 1 and start + block_bytes < size else -1
            blocks.append(Block(len(blocks), f, path, start, end))
    return blocks


def block_file(work: str, index: int, suffix: str) -> str:
    return os.path.join(work, "blocks", f"{index:05d}{suffix}")


def save_npy(path: str, array: np.ndarray) -> None:
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def stage_stats() -> dict:
    return {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "seconds": 0.0, "dropped": {}}


def _count(st: dict, size: int, kept: bool, seconds: float, reason: str | None = None) -> None:
    st["docs_in"] += 1
    st["bytes_in"] += size
    st["seconds"] += seconds
    st["docs_out"] += int(kept)
    if reason:
        st["dropped"][reason] = st["dropped"].get(reason, 0) + 1


def _clean_one(text: str, c: PrepareConfig, stages: dict, pii_counts: collections.Counter) -> str | None:
    """The per-document stages, counted into `stages`; the clean text, or None when dropped."""
    size = len(text.encode("utf-8"))
    if c.normalize:
        t = time.perf_counter()
        text = normalize.normalize(text)
        _count(stages["normalize"], size, bool(text), time.perf_counter() - t, None if text else "empty")
        if not text:
            return None
    if c.filters:
        t = time.perf_counter()
        reason = filters.check(text, c)
        _count(stages["filter"], size, not reason, time.perf_counter() - t, reason)
        if reason:
            return None
    if c.pii:
        t = time.perf_counter()
        text, counts = pii.scrub(text)
        _count(stages["pii"], size, True, time.perf_counter() - t)
        pii_counts.update(counts)
    return text


def exact_key(text: str) -> tuple[int, int]:
    """128 bits of SHA-1 of the text with case and whitespace folded, as two uint64."""
    digest = hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def clean_block(block: Block, c: PrepareConfig, work: str) -> dict:
    """Reads and cleans one block; writes its texts, ids, exact keys, sizes and signatures; returns its stats."""
    stages = {name: stage_stats() for name in ("read", "normalize", "filter", "pii")}
    pii_counts: collections.Counter = collections.Counter()
    file_stats = readers.FileStats(block.path)
    ids, texts = [], []
    t = time.perf_counter()
    end = float("inf") if block.end < 0 else block.end
    read_seconds = 0.0
    for position, text in readers.read_positioned(block.path, c, file_stats, block.start, end):
        read_seconds += time.perf_counter() - t
        _count(stages["read"], len(text.encode("utf-8")), True, 0.0)
        clean = _clean_one(text, c, stages, pii_counts)
        if clean is not None:
            ids.append((block.file << ID_BITS) | position)
            texts.append(clean)
        t = time.perf_counter()
    stages["read"]["seconds"] = read_seconds + time.perf_counter() - t
    t = time.perf_counter()
    sigs = minhash.signatures(texts, c.minhash_ngram, c.minhash_perms) if c.dedup_near else np.zeros((len(texts), 0), np.uint32)
    sign_seconds = time.perf_counter() - t
    with atomic.replacing(block_file(work, block.index, ".jsonl")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in texts)
    meta = np.zeros((len(texts), 4), np.uint64)  # id, exact key (2 words), bytes
    if texts:
        meta[:, 0] = ids
        meta[:, 1:3] = [exact_key(d) for d in texts]
        meta[:, 3] = [len(d.encode("utf-8")) for d in texts]
    save_npy(block_file(work, block.index, ".meta.npy"), meta)
    save_npy(block_file(work, block.index, ".sigs.npy"), sigs)
    stats = {"docs": len(texts), "stages": stages, "pii": dict(pii_counts), "sign_seconds": sign_seconds,
             "file": dataclasses.asdict(file_stats), "start": block.start}
    atomic.write_json(block_file(work, block.index, ".json"), stats)
    return stats


def _meta(work: str, index: int) -> np.ndarray:
    return np.load(block_file(work, index, ".meta.npy"))


def _dropped(ids: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """Mask of `ids` found in the sorted array `dropped`."""
    if not len(dropped):
        return np.zeros(len(ids), bool)
    at = np.minimum(np.searchsorted(dropped, ids), len(dropped) - 1)
    return dropped[at] == ids


def _split(records: np.ndarray, keys: np.ndarray, parts: int) -> list[np.ndarray]:
    owner = minhash.partition_of(keys, parts)
    return [records[owner == j] for j in range(parts)]


# ---- exact dedup ------------------------------------------------------------------------------------

def exact_map(index: int, parts: int, work: str) -> list[np.ndarray]:
    meta = _meta(work, index)
    return _split(meta[:, [1, 2, 0]], meta[:, 1], parts)  # (key0, key1, id)


def exact_reduce(part: int, column: list[np.ndarray]) -> np.ndarray:
    """Sorted ids whose text has a lower id with the same key."""
    rec = np.concatenate(column)
    rec = rec[np.lexsort((rec[:, 2], rec[:, 1], rec[:, 0]))]
    later = np.zeros(len(rec), bool)
    later[1:] = (rec[1:, 0] == rec[:-1, 0]) & (rec[1:, 1] == rec[:-1, 1])
    return np.sort(rec[later, 2].astype(np.int64))


# ---- near dedup -------------------------------------------------------------------------------------

def near_map(index: int, parts: int, work: str, bands: int, exact_dropped: np.ndarray) -> list[np.ndarray]:
    ids = _meta(work, index)[:, 0].astype(np.int64)
    sigs = np.load(block_file(work, index, ".sigs.npy"))
    keep = ~_dropped(ids, exact_dropped)
    ids, sigs = ids[keep], sigs[keep]
    keys = minhash.band_keys(sigs, bands).reshape(-1)
    records = np.stack([keys, np.repeat(ids, bands).astype(np.uint64)], 1)  # (band key, id)
    return _split(records, keys, parts)


class SignatureLookup:
    """Signatures by document id, read from the blocks' files on demand (memory-mapped)."""

    def __init__(self, work: str, first_ids: np.ndarray):
        self.work, self.first_ids = work, first_ids
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._blocks:
            self._blocks[b] = (_meta(self.work, b)[:, 0].astype(np.int64),
                               np.load(block_file(self.work, b, ".sigs.npy"), mmap_mode="r"))
        return self._blocks[b]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        blocks = np.searchsorted(self.first_ids, ids, side="right") - 1
        out = None
        for b in np.unique(blocks):
            block_ids, sigs = self._block(int(b))
            at = blocks == b
            rows = sigs[np.searchsorted(block_ids, ids[at])]
            out = np.zeros((len(ids), rows.shape[1]), np.uint32) if out is None else out
            out[at] = rows
        return out


def near_reduce(part: int, column: list[np.ndarray], work: str, threshold: float, first_ids: np.ndarray) -> tuple[np.ndarray, dict]:
    """Verified edges (lower id first) among the documents sharing a band key; and counts."""
    t = time.perf_counter()
    rec = np.concatenate(column)
    edges = minhash.candidate_edges(rec[:, 0], rec[:, 1].astype(np.int64))
    verified = minhash.verify(edges, SignatureLookup(work, first_ids), threshold)
    return verified, {"records": len(rec), "candidates": len(edges), "verified": len(verified),
                      "seconds": time.perf_counter() - t}


# ---- connected components ---------------------------------------------------------------------------

def cc_init(edges: np.ndarray, parts: int) -> list[np.ndarray]:
    """Both directions of each edge, to the partition owning the source."""
    both = np.concatenate([edges, edges[:, ::-1]]) if len(edges) else np.zeros((0, 2), np.int64)
    return _split(both, both[:, 0], parts)


def cc_start(part: int, column: list[np.ndarray]) -> tuple[dict, bool]:
    """Partition `part`'s state: its directed edges, its nodes, each labelled with itself."""
    edges = np.unique(np.concatenate(column), axis=0)
    nodes = np.unique(edges[:, 0]) if len(edges) else np.zeros(0, np.int64)
    return {"edges": edges, "nodes": nodes, "labels": nodes.copy(), "part": part}, bool(len(edges))


def cc_offer(state: dict, parts: int) -> list:
    """Offers (target, source's label) to the partitions owning the targets; this partition's state rides
    along in the piece for its own reducer."""
    edges, nodes, labels = state["edges"], state["nodes"], state["labels"]
    offers = np.stack([edges[:, 1], labels[np.searchsorted(nodes, edges[:, 0])]], 1) if len(edges) else edges
    pieces = _split(offers, offers[:, 0], parts) if len(offers) else [offers] * parts
    owner = state["part"]
    return [(p, state if j == owner else None) for j, p in enumerate(pieces)]


def cc_apply(part: int, column: list) -> tuple[dict, bool]:
    state = next(s for _, s in column if s is not None)
    offers = np.concatenate([p for p, _ in column])
    labels, changed = minhash.apply_offers(state["nodes"], state["labels"], offers)
    return {**state, "labels": labels}, changed


def cc_dropped(state: dict) -> np.ndarray:
    return state["nodes"][state["labels"] != state["nodes"]]


# ---- keep and shard ---------------------------------------------------------------------------------

def keep_block(index: int, work: str, exact_dropped: np.ndarray, near_dropped: np.ndarray, contamination) -> dict:
    """Writes the rows of the block's documents that survive dedup and decontamination; returns counts."""
    meta = _meta(work, index)
    ids = meta[:, 0].astype(np.int64)
    exact = _dropped(ids, exact_dropped)
    near = _dropped(ids, near_dropped) & ~exact
    rows = np.flatnonzero(~exact & ~near)
    st = stage_stats()
    if contamination is not None:
        texts = block_texts(work, index)
        keep = []
        for r in rows:
            t = time.perf_counter()
            bad = contamination.is_contaminated(texts[r])
            _count(st, int(meta[r, 3]), not bad, time.perf_counter() - t, "contaminated" if bad else None)
            if not bad:
                keep.append(r)
        rows = np.asarray(keep, np.int64)
    save_npy(block_file(work, index, ".kept.npy"), rows.astype(np.int64))
    sizes = meta[:, 3].astype(np.int64)
    stats = {"docs": len(ids), "exact": int(exact.sum()), "near": int(near.sum()), "kept": len(rows),
             "bytes": int(sizes.sum()), "bytes_after_exact": int(sizes[~exact].sum()), "decontaminate": st}
    atomic.write_json(block_file(work, index, ".kept.json"), stats)
    return stats


def block_texts(work: str, index: int) -> list[str]:
    with open(block_file(work, index, ".jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def kept_texts(work: str, pieces: list[tuple[int, int, int]]) -> list[str]:
    """The kept documents of (block, first, end) runs of kept rows."""
    out = []
    for block, lo, hi in pieces:
        texts = block_texts(work, block)
        rows = np.load(block_file(work, block, ".kept.npy"))[lo:hi]
        out += [texts[r] for r in rows]
    return out


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    return tokenizer_lib.load(path)


def write_shard(item: tuple[int, list], out: str, work: str, tokenizer_path: str) -> dict:
    """Shard `index` from its runs of kept documents; returns its counts."""
    index, pieces = item
    t = time.perf_counter()
    docs = kept_texts(work, pieces)
    tok = _tokenizer(tokenizer_path)
    bos = [tok.bos_id()] if tok.bos_id() >= 0 else []
    encoded = [np.asarray(bos + ids + [tok.eos_id()], np.int32) for ids in tok.encode_batch(docs)]
    shards.write(os.path.join(out, shards.shard_name(index)), encoded)
    return {"index": index, "docs": len(docs), "tokens": int(sum(len(e) for e in encoded)),
            "seconds": time.perf_counter() - t, "bytes": sum(len(d.encode("utf-8")) for d in docs)}
