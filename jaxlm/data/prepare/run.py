"""`jaxlm data prepare`: raw text files to clean, deduplicated, tokenized ArrayRecord shards + manifest.

    plan blocks -> clean (read, normalize, filter, pii, keys, signatures; per block)
    -> exact dedup (shuffle) -> near dedup (shuffle, verify, connected components)
    -> keep (drop duplicates, decontaminate; per block) -> tokenizer (given, or trained on the kept text)
    -> shards (per shard) -> manifest.json

The stages are `stages`' pure functions; an engine (`engines`: local processes or a Ray cluster) runs them,
and both give byte-identical shards. Every stage leaves its results under `work/` (per block where it works
per block) under temporary names renamed when complete, and the manifest comes last: a killed run leaves
nothing that looks complete, and a re-run with the same inputs and settings redoes only what is missing. A
run with other inputs or settings says which changed and starts over in the same folder.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np

from jaxlm.core import atomic, rundir
from jaxlm.core.config import ConfigError, PrepareConfig, check_fields
from jaxlm.data import readers, shards, tokenizer as tokenizer_lib
from jaxlm.data.prepare import decontaminate, engines, normalize, stages

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WORK = "work"
FORMAT = 2
# Settings that change how the work runs, never what it produces.
EXECUTION = ("workers", "block_kb")


def write_json(path: str, obj) -> None:
    """Manifests and stats: compact, and readable in any script."""
    atomic.write_json(path, obj, indent=1, ensure_ascii=False)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def settings(c: PrepareConfig) -> dict:
    """The settings that decide the output (the manifest's "config")."""
    return {k: v for k, v in dataclasses.asdict(c).items() if k not in EXECUTION}


def run_key(inputs: list[str], c: PrepareConfig) -> str:
    """Identifies a preparation: its settings and each input file's path, size and modification time."""
    files = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in inputs]
    blob = json.dumps([settings(c), files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _remove_stale(out: str) -> None:
    """Deletes the files of an earlier preparation with other inputs or config (only jaxlm's own files)."""
    for name in (WORK, "clean"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in os.listdir(out):
        if name == MANIFEST or name.startswith(("shard-", *rundir.TOKENIZER_FILES)):
            os.remove(os.path.join(out, name))


def _claim(out: str, paths: list[str], c: PrepareConfig, key: str) -> str:
    """The work folder of this preparation: resumed when it is this one's, else emptied, saying why."""
    work = os.path.join(out, WORK)
    previous = _read_json(os.path.join(work, "key.json"))
    if previous and previous["key"] != key:
        changed = [f"{k}: {previous['config'].get(k)!r} -> {v!r}" for k, v in settings(c).items()
                   if previous["config"].get(k) != v]
        why = ", ".join(changed) if changed else "the input files changed"
        log.warning("%s holds a preparation with other settings (%s); starting over", out, why)
    if not previous or previous["key"] != key:
        _remove_stale(out)
    elif os.path.isdir(work):
        log.info("resuming the preparation in %s", out)
    os.makedirs(os.path.join(work, "blocks"), exist_ok=True)
    for folder in (out, os.path.join(work, "blocks"), work):
        shards.remove_partial(folder)
    write_json(os.path.join(work, "key.json"), {"key": key, "config": settings(c), "inputs": paths})
    return work


def _plan(work: str, paths: list[str], c: PrepareConfig, workers: int) -> list[stages.Block]:
    """The input blocks, kept from the first attempt so that a resumed run at another worker count reuses its
    finished blocks. Blocks are small enough that every worker gets several, and at most block_kb."""
    saved = _read_json(os.path.join(work, "plan.json"))
    if saved:
        return [stages.Block(**b) for b in saved]
    total = sum(os.path.getsize(p) for p in paths)
    size = max(64 << 10, min(c.block_kb << 10, -(-total // (4 * workers))))
    blocks = stages.plan(paths, size)
    write_json(os.path.join(work, "plan.json"), [dataclasses.asdict(b) for b in blocks])
    return blocks
# ---- the stages, driven -----------------------------------------------------------------------------

def _clean(ex, work: str, blocks: list[stages.Block], c: PrepareConfig) -> list[dict]:
    todo = [b for b in blocks if not os.path.isfile(stages.block_file(work, b.index, ".json"))]
    if len(todo) < len(blocks):
        log.info("resuming: %d of %d blocks are already clean", len(blocks) - len(todo), len(blocks))
    ex.map(stages.clean_block, todo, c, work, desc="clean")
    return [_read_json(stages.block_file(work, b.index, ".json")) for b in blocks]


def _saved_ids(path: str, compute) -> tuple[np.ndarray, dict]:
    """A stage's dropped ids and counts from `path` (.npy, with its .json), computing and saving them once."""
    info = _read_json(path + ".json")
    if info is not None and os.path.isfile(path):
        return np.load(path), info
    dropped, info = compute()
    stages.save_npy(path, dropped)
    write_json(path + ".json", info)
    return dropped, info


def _exact(ex, work: str, blocks: list[stages.Block]) -> tuple[np.ndarray, dict]:
    def compute():
        t = time.perf_counter()
        out = ex.shuffle(stages.exact_map, [b.index for b in blocks], stages.exact_reduce, ex.workers,
                         map_args=(work,), desc="exact dedup")
        return np.sort(np.concatenate(out)), {"seconds": time.perf_counter() - t}

    return _saved_ids(os.path.join(work, "exact_dropped.npy"), compute)


def _near(ex, work: str, blocks: list[stages.Block], c: PrepareConfig, exact_dropped: np.ndarray):
    def compute():
        t = time.perf_counter()
        first_ids = np.asarray([b.first_id for b in blocks], np.int64)
        out = ex.shuffle(stages.near_map, [b.index for b in blocks], stages.near_reduce, ex.workers,
                         map_args=(work, c.minhash_bands, exact_dropped),
                         reduce_args=(work, c.minhash_threshold, first_ids), desc="near dedup")
        edges = [e for e, _ in out]
        dropped, rounds = components(ex, edges)
        # An edge found in several bands is counted once per partition that found it: the sums depend on the
        # partitioning, so they are execution figures; the unique verified edges are not.
        unique = len(np.unique(np.concatenate(edges), axis=0)) if sum(map(len, edges)) else 0
        execution = {k: int(sum(o[k] for _, o in out)) for k in ("records", "candidates", "verified")}
        return dropped, {"edges": unique, "component_rounds": rounds, "seconds": time.perf_counter() - t,
                         "execution": execution}

    return _saved_ids(os.path.join(work, "near_dropped.npy"), compute)


def components(ex, edge_parts: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Sorted ids that are not the lowest of their connected component, by min-label propagation over
    partitions (the partitions' states stay with the engine between rounds); and the number of rounds."""
    parts = ex.workers
    if not sum(len(e) for e in edge_parts):
        return np.zeros(0, np.int64), 0
    states, _ = ex.shuffle(stages.cc_init, edge_parts, stages.cc_start, parts, keep=True, desc="components")
    rounds, changed = 0, [True]
    while any(changed):
        states, changed = ex.shuffle(stages.cc_offer, states, stages.cc_apply, parts, keep=True)
        rounds += 1
    dropped = ex.map(stages.cc_dropped, states)
    return np.sort(np.concatenate(dropped)) if dropped else np.zeros(0, np.int64), rounds


def _keep(ex, work: str, blocks: list[stages.Block], c: PrepareConfig, exact_dropped, near_dropped) -> list[dict]:
    todo = [b.index for b in blocks if not os.path.isfile(stages.block_file(work, b.index, ".kept.json"))]
    if todo:
        contamination = None
        if c.decontaminate:
            eval_paths = readers.expand(c.decontaminate)
            eval_docs = (normalize.normalize(d) for p in eval_paths for d in readers.read(p, c, readers.FileStats(p)))
            contamination = decontaminate.Decontaminator(eval_docs, c.decontaminate_ngram)
            log.info("decontaminating against %d eval documents (%d %d-grams)", contamination.eval_docs,
                     len(contamination.ngrams), c.decontaminate_ngram)
        ex.map(stages.keep_block, todo, work, exact_dropped, near_dropped, contamination, desc="keep")
    return [_read_json(stages.block_file(work, b.index, ".kept.json")) for b in blocks]


def _tokenizer(out: str, work: str, c: PrepareConfig, blocks: list[stages.Block]) -> tuple[str, float]:
    """Copies the given tokenizer into `out`, or trains one on the kept text. Returns (path, seconds)."""
    if c.tokenizer:
        tokenizer_lib.load(c.tokenizer)  # fails with a clear message on a bad file
        return tokenizer_lib.copy_into(c.tokenizer, out), 0.0
    path = os.path.join(out, rundir.SENTENCEPIECE)
    if os.path.isfile(path):  # trained by an earlier, interrupted run of this same preparation
        return path, 0.0
    docs = (line for b in blocks for d in stages.kept_texts(work, [(b.index, 0, None)])
            for line in d.split("\n") if line.strip())
    t = time.perf_counter()
    log.info("training a %d-piece %s sentencepiece tokenizer", c.vocab_size, c.tokenizer_type)
    try:
        tokenizer_lib.train(docs, c.vocab_size, c.tokenizer_type, path, max_sentences=2_000_000)
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece could not train a {c.vocab_size}-piece tokenizer: {e}; "
                          "change vocab_size (CJK text needs several thousand pieces) or give more text") from None
    return path, time.perf_counter() - t


def shard_pieces(kept_counts: list[int], per_shard: int) -> list[list[tuple[int, int, int]]]:
    """For each shard, the (block, first, end) runs of kept rows it holds: shard i is kept documents
    i*per_shard .. (i+1)*per_shard - 1 in id order."""
    out: list[list] = []
    room = 0
    for block, count in enumerate(kept_counts):
        lo = 0
        while lo < count:
            if not room:
                out.append([])
                room = per_shard
            hi = min(count, lo + room)
            out[-1].append((block, lo, hi))
            room -= hi - lo
            lo = hi
    return out


def _shards(ex, out: str, work: str, kept: list[dict], c: PrepareConfig, tok_path: str) -> tuple[list, dict]:
    pieces = shard_pieces([k["kept"] for k in kept], c.docs_per_shard)
    todo = [(i, p) for i, p in enumerate(pieces) if not shards.is_complete(os.path.join(out, shards.shard_name(i)))]
    t = time.perf_counter()
    done = ex.map(stages.write_shard, todo, out, work, tok_path, desc="tokenize")
    stats = {"docs_in": sum(k["kept"] for k in kept), "shards_written": len(todo),
             "bytes_in": sum(d["bytes"] for d in done), "seconds": round(sum(d["seconds"] for d in done), 4),
             "wall_seconds": round(time.perf_counter() - t, 4)}
    shard_list = []
    for i in range(len(pieces)):
        name = shards.shard_name(i)
        lengths = np.load(shards.lengths_path(os.path.join(out, name)))
        shard_list.append({"file": name, "docs": int(len(lengths)), "tokens": int(lengths.sum())})
    return shard_list, stats


def shard_texts(out: str, index: int) -> list[str]:
    """The text of a prepared folder's shard `index`, as it was tokenized (for checks and inspection)."""
    work = os.path.join(out, WORK)
    manifest = _read_json(os.path.join(out, MANIFEST))
    if manifest is None:
        raise ConfigError(f"{out} has no manifest.json: the preparation did not finish")
    plan = _read_json(os.path.join(work, "plan.json"))
    counts = [len(np.load(stages.block_file(work, b["index"], ".kept.npy"))) for b in plan]
    return stages.kept_texts(work, shard_pieces(counts, manifest["config"]["docs_per_shard"])[index])


# ---- stats ------------------------------------------------------------------------------------------

def _sum_stages(items: list[dict]) -> dict:
    total = stages.stage_stats()
    for st in items:
        for k in ("docs_in", "docs_out", "bytes_in", "seconds"):
            total[k] += st[k]
        for reason, n in st["dropped"].items():
            total["dropped"][reason] = total["dropped"].get(reason, 0) + n
    total["seconds"] = round(total["seconds"], 4)
    return total


def _files(paths: list[str], blocks: list[stages.Block], cleaned: list[dict]) -> list[dict]:
    """Per input file, its blocks' reader counts added up."""
    files = [dataclasses.asdict(readers.FileStats(p)) for p in paths]
    for b, st in zip(blocks, cleaned):
        f, part = files[b.file], st["file"]
        for k in ("docs", "malformed_json", "invalid_utf8", "missing_field", "huge"):
            f[k] += part[k]
        if b.start == 0:
            f["bytes"], f["empty_file"] = part["bytes"], part["empty_file"]
        f["error"] = f["error"] or part["error"]
    for f in files:
        if f["error"]:
            log.warning("%s: %s", f["path"], f["error"])
    return files


def _stage_stats(cleaned: list[dict], kept: list[dict], exact: dict, near: dict, c: PrepareConfig) -> dict:
    out = {name: _sum_stages([b["stages"][name] for b in cleaned]) for name in ("read", "normalize", "filter", "pii")}
    docs = sum(k["docs"] for k in kept)
    n_exact, n_near = sum(k["exact"] for k in kept), sum(k["near"] for k in kept)
    out["exact_dedup"] = {"docs_in": docs, "docs_out": docs - n_exact, "bytes_in": sum(k["bytes"] for k in kept),
                          "seconds": round(exact.get("seconds", 0.0), 4),
                          "dropped": {"duplicate": n_exact} if n_exact else {}}
    near_seconds = near.get("seconds", 0.0) + sum(b["sign_seconds"] for b in cleaned) * c.dedup_near
    out["near_dedup"] = {"docs_in": docs - n_exact, "docs_out": docs - n_exact - n_near,
                         "bytes_in": sum(k["bytes_after_exact"] for k in kept), "seconds": round(near_seconds, 4),
                         "dropped": {"duplicate": n_near} if n_near else {},
                         **{k: near[k] for k in ("edges", "component_rounds") if k in near}}
    out["decontaminate"] = _sum_stages([k["decontaminate"] for k in kept])
    return out


class _Walls:
    """Wall-clock seconds per stage of this run (a resumed stage counts what it redid)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        self.seconds[name] = round(time.perf_counter() - t, 4)
        return result


def prepare(inputs: list[str], out: str, c: PrepareConfig, progress: bool = True, engine: str = "local",
            ray_address: str = "") -> dict:
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
    ex = engines.make(engine, c.workers, progress, ray_address)
    t0 = time.perf_counter()
    with ex:
        work = _claim(out, paths, c, key)
        blocks = _plan(work, paths, c, ex.workers)
        walls = _Walls()
        cleaned = walls("clean", _clean, ex, work, blocks, c)
        if not sum(b["docs"] for b in cleaned):
            raise ConfigError(f"no document of {len(paths)} input files survived cleaning; see the block stats "
                              f"in {work}/blocks for what each stage dropped, and loosen the filters")
        none = (np.zeros(0, np.int64), {})
        exact_dropped, exact = walls("exact_dedup", _exact, ex, work, blocks) if c.dedup_exact else none
        near_dropped, near = walls("near_dedup", _near, ex, work, blocks, c, exact_dropped) if c.dedup_near else none
        kept = walls("keep", _keep, ex, work, blocks, c, exact_dropped, near_dropped)
        tok_path, tok_seconds = walls("tokenizer", _tokenizer, out, work, c, blocks)
        shard_list, tokenize = walls("shards", _shards, ex, out, work, kept, c, tok_path)
        workers = ex.workers
    tok = tokenizer_lib.load(tok_path)
    pii_counts: collections.Counter = collections.Counter()
    for b in cleaned:
        pii_counts.update(b["pii"])
    manifest = {
        "format": FORMAT, "key": key, "inputs": paths, "config": settings(c),
        "documents": sum(s["docs"] for s in shard_list), "tokens": sum(s["tokens"] for s in shard_list),
        "tokenizer": {"file": os.path.basename(tok_path), "hash": tokenizer_lib.file_hash(tok_path),
                      "vocab_size": tok.vocab_size(), "bos_id": tok.bos_id(), "eos_id": tok.eos_id(),
                      "train_seconds": round(tok_seconds, 3)},
        "stages": {**_stage_stats(cleaned, kept, exact, near, c), "tokenize": tokenize},
        "pii": dict(pii_counts), "files": _files(paths, blocks, cleaned), "shards": shard_list,
        "execution": {"engine": ex.name, "workers": workers, "blocks": len(blocks),
                      "wall_seconds": round(time.perf_counter() - t0, 3), "stage_wall_seconds": walls.seconds,
                      "near_dedup": near.get("execution", {})},
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
