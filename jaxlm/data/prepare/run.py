"""`jaxlm data prepare`: raw text files to clean, deduplicated, tokenized ArrayRecord shards + manifest.

    read -> normalize -> filter -> pii -> exact dedup -> near dedup -> decontaminate   (pass 1, `clean/`)
    -> tokenizer (given, or trained on the clean text) -> tokenize into shards          (pass 2, in parallel)
    -> manifest.json

Per-document stages run in a pool of processes in input order; the dedup and decontamination stages need
the whole corpus and run in the main process. Pass 1 writes its documents in chunks of `docs_per_shard`
and ends by writing `clean/stats.json`; pass 2 turns chunk i into shard i. Every file is written under a
temporary name and renamed, and the manifest comes last, so a killed run leaves nothing that looks
complete: a re-run with the same inputs and config skips what is done (pass 1 as a whole, then each
finished shard) and redoes the rest; a run with other inputs or config starts over in the same folder.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from typing import Iterator

import numpy as np
from tqdm import tqdm

from jaxlm.core import atomic, rundir
from jaxlm.core.config import ConfigError, PrepareConfig, check_fields
from jaxlm.data import readers, shards, tokenizer as tokenizer_lib
from jaxlm.data.prepare import decontaminate, dedup, filters, normalize, pii

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATS = os.path.join("clean", "stats.json")
FORMAT = 1


def write_json(path: str, obj) -> None:
    """Manifests and stats: compact, and readable in any script."""
    atomic.write_json(path, obj, indent=1, ensure_ascii=False)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def run_key(inputs: list[str], c: PrepareConfig) -> str:
    """Identifies a preparation: the config and each input file's path, size and modification time."""
    files = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in inputs]
    blob = json.dumps([dataclasses.asdict(c), files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _InProcess:
    """The Pool calls used here, run in this process: with one worker a pool only adds start-up time."""

    def __init__(self, initializer, initargs):
        initializer(*initargs)

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)

    imap_unordered = imap

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pool(workers: int, initializer, initargs):
    # "spawn", not fork: the parent may hold JAX or grain threads, which fork would copy mid-flight.
    if workers == 1:
        return _InProcess(initializer, initargs)
    return multiprocessing.get_context("spawn").Pool(workers, initializer, initargs)


# ---- pass 1: cleaning -------------------------------------------------------------------------------

_CONFIG: PrepareConfig | None = None  # set in each worker by _init_worker


def _init_worker(c: PrepareConfig) -> None:
    global _CONFIG
    _CONFIG = c


def _clean_one(text: str) -> tuple[str | None, str | None, dict, dict, int]:
    """Runs the per-document stages. Returns (text or None, why dropped, PII counts, seconds per stage,
    input bytes)."""
    c, seconds, size = _CONFIG, {}, len(text.encode("utf-8"))
    t = time.perf_counter()
    if c.normalize:
        text = normalize.normalize(text)
        seconds["normalize"] = time.perf_counter() - t
        if not text:
            return None, "empty", {}, seconds, size
    if c.filters:
        t = time.perf_counter()
        reason = filters.check(text, c)
        seconds["filter"] = time.perf_counter() - t
        if reason:
            return None, reason, {}, seconds, size
    counts = {}
    if c.pii:
        t = time.perf_counter()
        text, counts = pii.scrub(text)
        seconds["pii"] = time.perf_counter() - t
    return text, None, dict(counts), seconds, size


class _Stage:
    def __init__(self):
        self.docs_in = self.docs_out = self.bytes_in = 0
        self.seconds = 0.0
        self.dropped: collections.Counter = collections.Counter()

    def as_dict(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "seconds": round(self.seconds, 4), "dropped": dict(self.dropped)}


def _read_all(paths: list[str], c: PrepareConfig, file_stats: list, stage: _Stage) -> Iterator[str]:
    for path in paths:
        stats = readers.FileStats(path)
        file_stats.append(stats)
        t = time.perf_counter()
        for text in readers.read(path, c, stats):
            stage.seconds += time.perf_counter() - t
            stage.docs_in += 1
            stage.docs_out += 1
            stage.bytes_in += len(text.encode("utf-8"))
            yield text
            t = time.perf_counter()
        stage.seconds += time.perf_counter() - t
        if stats.error:
            log.warning("%s: %s", path, stats.error)


def _clean(paths: list[str], out: str, c: PrepareConfig, key: str, workers: int, progress: bool) -> dict:
    stages = {name: _Stage() for name in ("read", "normalize", "filter", "pii", "exact_dedup", "near_dedup",
                                          "decontaminate")}
    pii_counts: collections.Counter = collections.Counter()
    file_stats: list[readers.FileStats] = []
    exact = dedup.ExactDedup() if c.dedup_exact else None
    near = dedup.NearDedup(c.minhash_ngram, c.minhash_perms, c.minhash_bands, c.minhash_threshold) if c.dedup_near else None
    contamination = None
    if c.decontaminate:
        eval_paths = readers.expand(c.decontaminate)
        eval_docs = (normalize.normalize(d) for p in eval_paths for d in readers.read(p, c, readers.FileStats(p)))
        contamination = decontaminate.Decontaminator(eval_docs, c.decontaminate_ngram)
        log.info("decontaminating against %d eval documents (%d %d-grams)", contamination.eval_docs,
                 len(contamination.ngrams), c.decontaminate_ngram)
    os.makedirs(os.path.join(out, "clean"), exist_ok=True)
    chunk: list[str] = []
    chunks = kept = 0

    def flush() -> None:
        nonlocal chunk, chunks
        path = os.path.join(out, "clean", f"chunk-{chunks:05d}.jsonl")
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in chunk)
        os.replace(tmp, path)
        chunk, chunks = [], chunks + 1

    def timed(stage: _Stage, text: str, drop) -> bool:
        stage.docs_in += 1
        stage.bytes_in += len(text.encode("utf-8"))
        t = time.perf_counter()
        dropped = drop(text)
        stage.seconds += time.perf_counter() - t
        if dropped:
            stage.dropped["duplicate" if stage is not stages["decontaminate"] else "contaminated"] += 1
        else:
            stage.docs_out += 1
        return dropped

    docs = _read_all(paths, c, file_stats, stages["read"])
    with _pool(workers, _init_worker, (c,)) as pool:
        results = pool.imap(_clean_one, docs, chunksize=8)
        bar = tqdm(results, desc="clean", unit="doc", disable=not progress, mininterval=1.0)
        for text, reason, counts, seconds, size in bar:
            dropped_by = "normalize" if reason == "empty" else "filter" if reason else None
            for name, s in seconds.items():
                stages[name].docs_in += 1
                stages[name].bytes_in += size
                stages[name].seconds += s
                stages[name].docs_out += int(name != dropped_by)
            if reason:
                stages[dropped_by].dropped[reason] += 1
                continue
            pii_counts.update(counts)
            if exact and timed(stages["exact_dedup"], text, exact.is_duplicate):
                continue
            if near and timed(stages["near_dedup"], text, near.is_duplicate):
                continue
            if contamination and timed(stages["decontaminate"], text, contamination.is_contaminated):
                continue
            chunk.append(text)
            kept += 1
            if len(chunk) == c.docs_per_shard:
                flush()
    if chunk:
        flush()
    stats = {"key": key, "documents": kept, "chunks": chunks,
             "files": [dataclasses.asdict(s) for s in file_stats],
             "stages": {name: s.as_dict() for name, s in stages.items()}, "pii": dict(pii_counts)}
    write_json(os.path.join(out, STATS), stats)
    return stats


def _chunk_docs(out: str, index: int) -> list[str]:
    with open(os.path.join(out, "clean", f"chunk-{index:05d}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ---- pass 2: tokenizer and shards -------------------------------------------------------------------

def _tokenizer(out: str, c: PrepareConfig, chunks: int) -> tuple[str, float]:
    """Copies the given tokenizer into `out`, or trains one on the clean text. Returns (path, seconds)."""
    if c.tokenizer:
        tokenizer_lib.load(c.tokenizer)  # fails with a clear message on a bad file
        return tokenizer_lib.copy_into(c.tokenizer, out), 0.0
    path = os.path.join(out, rundir.SENTENCEPIECE)
    if os.path.isfile(path):  # trained by an earlier, interrupted run of this same preparation
        return path, 0.0
    docs = (line for i in range(chunks) for d in _chunk_docs(out, i) for line in d.split("\n") if line.strip())
    t = time.perf_counter()
    log.info("training a %d-piece %s sentencepiece tokenizer", c.vocab_size, c.tokenizer_type)
    try:
        tokenizer_lib.train(docs, c.vocab_size, c.tokenizer_type, path, max_sentences=2_000_000)
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece could not train a {c.vocab_size}-piece tokenizer: {e}; "
                          "change vocab_size (CJK text needs several thousand pieces) or give more text") from None
    return path, time.perf_counter() - t


_TOKENIZER = None


def _init_tokenize_worker(path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer_lib.load(path)


def _tokenize_chunk(args: tuple[str, int]) -> tuple[int, int, int, float, int]:
    """Chunk i -> shard i. Returns (index, docs, tokens, seconds, text bytes)."""
    out, index = args
    t = time.perf_counter()
    docs = _chunk_docs(out, index)
    tok = _TOKENIZER
    bos = [tok.bos_id()] if tok.bos_id() >= 0 else []
    encoded = [np.asarray(bos + ids + [tok.eos_id()], np.int32) for ids in tok.encode_batch(docs)]
    shards.write(os.path.join(out, shards.shard_name(index)), encoded)
    return index, len(docs), int(sum(len(e) for e in encoded)), time.perf_counter() - t, \
        sum(len(d.encode("utf-8")) for d in docs)


def _remove_stale(out: str) -> None:
    """Deletes the files of an earlier preparation with other inputs or config (only jaxlm's own files)."""
    shutil.rmtree(os.path.join(out, "clean"), ignore_errors=True)
    for name in os.listdir(out):
        if name == MANIFEST or name.startswith(("shard-", *rundir.TOKENIZER_FILES)):
            os.remove(os.path.join(out, name))


def prepare(inputs: list[str], out: str, c: PrepareConfig, progress: bool = True) -> dict:
    """Prepares `inputs` (files or globs) into `out` and returns the manifest."""
    paths = readers.expand(inputs)
    if c.minhash_perms % c.minhash_bands:
        raise ConfigError(f"minhash_perms={c.minhash_perms} must be divisible by minhash_bands={c.minhash_bands}")
    out = os.path.abspath(os.path.expanduser(out))
    os.makedirs(out, exist_ok=True)
    key = run_key(paths, c)
    manifest = _read_json(os.path.join(out, MANIFEST))
    if manifest and manifest.get("key") == key:
        log.info("%s is already prepared from these inputs with this config", out)
        return manifest
    workers = c.workers or os.cpu_count() or 1
    stats = _read_json(os.path.join(out, STATS))
    if not stats or stats.get("key") != key:
        if os.listdir(out):
            _remove_stale(out)
        shards.remove_partial(out)
        t = time.perf_counter()
        stats = _clean(paths, out, c, key, workers, progress)
        log.info("cleaned %d files in %.1fs: %d documents kept", len(paths), time.perf_counter() - t, stats["documents"])
    else:
        log.info("resuming: the cleaning pass is done (%d documents)", stats["documents"])
    if not stats["documents"]:
        raise ConfigError(f"no document of {len(paths)} input files survived cleaning; see {out}/{STATS} "
                          "for what each stage dropped, and loosen the filters")
    removed = shards.remove_partial(out)
    if removed:
        log.info("removed %d partial files of an interrupted run", removed)

    tok_path, tok_seconds = _tokenizer(out, c, stats["chunks"])
    tok = tokenizer_lib.load(tok_path)
    todo = [i for i in range(stats["chunks"]) if not shards.is_complete(os.path.join(out, shards.shard_name(i)))]
    t = time.perf_counter()
    seconds = text_bytes = 0.0
    if todo:
        with _pool(min(workers, len(todo)), _init_tokenize_worker, (tok_path,)) as pool:
            for _, _, _, s, b in tqdm(pool.imap_unordered(_tokenize_chunk, [(out, i) for i in todo]),
                                      total=len(todo), desc="tokenize", unit="shard", disable=not progress):
                seconds += s
                text_bytes += b
    wall = time.perf_counter() - t
    shard_list = []
    for i in range(stats["chunks"]):
        name = shards.shard_name(i)
        lengths = np.load(shards.lengths_path(os.path.join(out, name)))
        shard_list.append({"file": name, "docs": int(len(lengths)), "tokens": int(lengths.sum())})
    manifest = {
        "format": FORMAT, "key": key, "inputs": paths, "config": dataclasses.asdict(c),
        "documents": stats["documents"], "tokens": sum(s["tokens"] for s in shard_list),
        "tokenizer": {"file": os.path.basename(tok_path), "hash": tokenizer_lib.file_hash(tok_path),
                      "vocab_size": tok.vocab_size(), "bos_id": tok.bos_id(), "eos_id": tok.eos_id(),
                      "train_seconds": round(tok_seconds, 3)},
        "stages": {**stats["stages"], "tokenize": {"docs_in": stats["documents"], "shards_written": len(todo),
                                                   "bytes_in": int(text_bytes), "seconds": round(seconds, 4),
                                                   "wall_seconds": round(wall, 4), "workers": workers}},
        "pii": stats["pii"], "files": stats["files"], "shards": shard_list,
    }
    write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def parse_config(words: list[str]) -> PrepareConfig:
    """PrepareConfig from `field=value` words, parsed and type-checked like the training overrides."""
    import difflib
    import typing

    from jaxlm.core import overrides

    hints = typing.get_type_hints(PrepareConfig)
    values = {}
    for word in words:
        key, _, text = word.partition("=")
        key = key.strip().removeprefix("prepare.")
        if key not in hints:
            near = difflib.get_close_matches(key, list(hints), n=1, cutoff=0.0)
            raise ConfigError(f"unknown prepare setting '{key}'" + (f"; did you mean '{near[0]}'?" if near else ""))
        if key in values:
            raise ConfigError(f"prepare setting '{key}' is given twice")
        values[key] = overrides.coerce(key, hints[key], overrides.parse_literal(key, text.strip(), hints[key]))
    config = PrepareConfig(**values)
    check_fields(config, "")  # the settings are typed without a section: name them as typed
    return config
