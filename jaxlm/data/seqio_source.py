"""seqio Tasks and Mixtures as jaxlm training data (the optional extra `jaxlm[seqio]`).

A registered seqio Task is read once, in order (`shuffle=False`, a fixed preprocessing seed), and its
already-tokenized feature (usually "targets") is written as a jaxlm prepared folder: ArrayRecord shards
(`shards.write`, atomic) + manifest.json, with the vocabulary's sentencepiece model (extra ids included,
as seqio builds it) as `tokenizer.model`, so `data.prepared`'s tokenizer-hash check applies. Training
then reads it like any prepared data: global shuffle, packing, mixing, exact resume. Nothing of seqio or
TensorFlow is needed after the export.

A Mixture becomes one folder per task (`OUT/<task>/`) plus `OUT/mixture.json` with the jaxlm weights.
seqio's rates count examples; jaxlm's weights count packed rows, i.e. tokens. To give each task the token
share it has under seqio (and T5X's packing), weight_i = rate_i * mean tokens per example_i.

A folder's manifest records a key (task name, split, feature, seed, seqio version, vocabulary hash,
preprocessor names and arguments, source files with size and mtime): an export with the same key is
reused, another one replaces jaxlm's files in the folder. The key cannot see a preprocessor's code, nor
data behind a source that lists no files: delete the folder to force a new export. An exclusive lock on
`OUT/.lock` keeps processes on one host from exporting into the same folder at once. TensorFlow is
imported only here, only when a seqio source is used, and is kept off any GPU (tf.data runs on the host;
JAX owns the accelerators).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import functools
import hashlib
import importlib
import json
import logging
import os
import re

import numpy as np
from tqdm import tqdm

from jaxlm.core import atomic, rundir
from jaxlm.core.config import Config, ConfigError
from jaxlm.data import shards, tokenizer as tokenizer_lib
from jaxlm.data.prepare import run as prepare

log = logging.getLogger(__name__)

MIXTURE = "mixture.json"
INSTALL = "pip install 'jaxlm[seqio]'"


@dataclasses.dataclass
class Export:
    folders: list[str]  # prepared folders, one per task
    weights: list[float]  # jaxlm data.weights for them (one folder: [1.0])
    documents: int
    tokens: int
    is_mixture: bool


def _seqio():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter about CUDA
    try:
        import seqio
        import tensorflow as tf
    except ImportError as e:
        raise ConfigError(f"seqio sources need seqio and TensorFlow ({e}); {INSTALL}") from None
    for kind in ("GPU", "TPU"):  # before any TF op: TF must not claim accelerator memory JAX will use
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.set_visible_devices([], kind)
    return seqio


def load(name: str, modules: str = ""):
    """The registered seqio Task or Mixture `name`, after importing `modules` (comma-separated) that
    register it."""
    seqio = _seqio()
    for module in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                raise ConfigError(f"seqio module {module!r} was not found; give an importable module that "
                                  "registers the task (its folder on PYTHONPATH, or run from that folder)") from None
            raise ConfigError(f"importing seqio module {module!r} failed: {e}") from None
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {near[0]!r}?" if near else (
        f"{len(known)} are registered" if known else "none is registered: give the module that registers it")
    where = f" after importing {modules}" if modules else ""
    raise ConfigError(f"no seqio Task or Mixture named {name!r}{where}; {hint}")


def _vocabulary(task, feature: str):
    seqio = _seqio()
    if feature not in task.output_features:
        raise ConfigError(f"seqio task {task.name!r} has no output feature {feature!r}; it has "
                          f"{', '.join(sorted(task.output_features))} (set the feature to one of them)")
    vocab = task.output_features[feature].vocabulary
    if not isinstance(vocab, seqio.SentencePieceVocabulary):
        raise ConfigError(f"seqio task {task.name!r}: feature {feature!r} uses {type(vocab).__name__}; "
                          "only SentencePieceVocabulary can be used for training (jaxlm needs its model file)")
    return vocab


def _describe(fn) -> str:
    """A preprocessor as stable text: function name and arguments, object addresses removed."""
    if isinstance(fn, functools.partial):
        text = f"{_describe(fn.func)}{fn.args!r}{sorted(fn.keywords.items())!r}"
    else:
        text = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _source_files(task, split: str) -> list:
    import tensorflow as tf

    try:
        files = task.source.list_shards(split)
    except Exception:  # noqa: BLE001 - some sources cannot list files without loading; they are keyed by name
        return []
    stats = []
    for f in files:
        try:
            s = tf.io.gfile.stat(f)
            stats.append([f, s.length, s.mtime_nsec])
        except tf.errors.OpError:
            stats.append([f])
    return stats


def task_key(task, split: str, feature: str, seed: int, sp_model: bytes) -> str:
    seqio = _seqio()
    parts = {"task": task.name, "split": split, "feature": feature, "seed": seed, "seqio": seqio.__version__,
             "vocabulary": hashlib.sha256(sp_model).hexdigest(), "add_eos": task.output_features[feature].add_eos,
             "source": type(task.source).__name__, "files": _source_files(task, split),
             "preprocessors": [_describe(p) for p in task.preprocessors]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@contextlib.contextmanager
def _locked(out: str):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def export_task(task, out: str, split: str, feature: str, seed: int = 0, docs_per_shard: int = 10_000,
                progress: bool = True) -> dict:
    """Writes `task`'s `feature` tokens for `split` into the prepared folder `out`; returns its manifest."""
    if split not in task.splits:
        raise ConfigError(f"seqio task {task.name!r} has no split {split!r}; it has {', '.join(task.splits)}")
    vocab = _vocabulary(task, feature)
    sp_model = vocab.sp_model
    key = task_key(task, split, feature, seed, sp_model)
    manifest_path = os.path.join(out, prepare.MANIFEST)
    manifest = prepare._read_json(manifest_path)
    if manifest and manifest.get("key") == key:
        log.info("%s: seqio task %s is already exported", out, task.name)
        return manifest
    os.makedirs(out, exist_ok=True)
    prepare._remove_stale(out)
    shards.remove_partial(out)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, MIXTURE))
    tok_path = os.path.join(out, rundir.SENTENCEPIECE)
    with atomic.replacing(tok_path) as tmp, open(tmp, "wb") as f:
        f.write(sp_model)
    pieces = vocab.tokenizer.GetPieceSize()

    ds = task.get_dataset(sequence_length=None, split=split, use_cached=task.requires_caching, shuffle=False,
                          seed=seed, num_epochs=1, trim_output_features=False)
    ds = ds.map(lambda ex: ex[feature])
    shard_list, chunk, empty = [], [], 0

    def flush() -> None:
        name = shards.shard_name(len(shard_list))
        shards.write(os.path.join(out, name), chunk)
        shard_list.append({"file": name, "docs": len(chunk), "tokens": int(sum(len(d) for d in chunk))})
        chunk.clear()

    bar = tqdm(ds.as_numpy_iterator(), desc=f"export {task.name}", unit="doc", disable=not progress,
               mininterval=1.0)
    for tokens in bar:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ConfigError(f"seqio task {task.name!r}: feature {feature!r} is {tokens.dtype} of shape "
                              f"{tokens.shape}, not a 1-D sequence of token ids; add seqio.preprocessors.tokenize")
        if not len(tokens):
            empty += 1
            continue
        if tokens.max() >= pieces or tokens.min() < 0:
            raise ConfigError(f"seqio task {task.name!r} yields token id {int(tokens.max())} outside its "
                              f"vocabulary's {pieces} sentencepiece pieces; such ids cannot be trained on")
        chunk.append(tokens.astype(np.int32))
        if len(chunk) == docs_per_shard:
            flush()
    if chunk:
        flush()
    if not shard_list:
        raise ConfigError(f"seqio task {task.name!r} yields no non-empty {feature!r} for split {split!r}")
    documents = sum(s["docs"] for s in shard_list)
    tok = vocab.tokenizer
    manifest = {
        "format": prepare.FORMAT, "key": key,
        "seqio": {"task": task.name, "split": split, "feature": feature, "seed": seed,
                  "source": type(task.source).__name__, "files": [f[0] for f in _source_files(task, split)],
                  "skipped_empty": empty},
        "documents": documents, "tokens": sum(s["tokens"] for s in shard_list),
        "tokenizer": {"file": rundir.SENTENCEPIECE, "hash": tokenizer_lib.file_hash(tok_path), "vocab_size": pieces,
                      "bos_id": tok.bos_id(), "eos_id": tok.eos_id(), "train_seconds": 0.0},
        "shards": shard_list,
    }
    prepare.write_json(manifest_path, manifest)
    log.info("exported seqio task %s (%s): %d documents, %d tokens -> %s", task.name, split, documents,
             manifest["tokens"], out)
    return manifest


def export(name: str, out: str, modules: str = "", split: str = "train", feature: str = "targets", seed: int = 0,
           docs_per_shard: int = 10_000, progress: bool = True) -> Export:
    """Exports the seqio Task or Mixture `name` into `out` (a prepared folder, or one per mixture task)."""
    seqio = _seqio()
    provider = load(name, modules)
    out = os.path.abspath(os.path.expanduser(out))
    with _locked(out):
        if isinstance(provider, seqio.Task):
            m = export_task(provider, out, split, feature, seed, docs_per_shard, progress)
            return Export([out], [1.0], m["documents"], m["tokens"], False)
        return _export_mixture(provider, out, split, feature, seed, docs_per_shard, progress)


def _export_mixture(mixture, out: str, split: str, feature: str, seed: int, docs_per_shard: int,
                    progress: bool) -> Export:
    tasks = [t for t in mixture.tasks if split in t.splits and mixture.get_rate(t) > 0]
    if not tasks:
        raise ConfigError(f"seqio mixture {mixture.name!r} has no task with split {split!r} and a positive rate")
    models = {hashlib.sha256(_vocabulary(t, feature).sp_model).hexdigest() for t in tasks}
    if len(models) > 1:
        raise ConfigError(f"the tasks of seqio mixture {mixture.name!r} use different vocabularies for {feature!r}; "
                          "a jaxlm mixture needs one tokenizer")
    os.makedirs(out, exist_ok=True)
    prepare._remove_stale(out)  # a single-task export that was here before
    entries = []
    for task in tasks:
        m = export_task(task, os.path.join(out, _safe(task.name)), split, feature, seed, docs_per_shard, progress)
        rate = float(mixture.get_rate(task))
        entries.append({"task": task.name, "folder": _safe(task.name), "rate": rate, "documents": m["documents"],
                        "tokens": m["tokens"], "weight": rate * m["tokens"] / m["documents"]})
    total = sum(e["weight"] for e in entries)
    for e in entries:
        e["weight"] /= total
    prepare.write_json(os.path.join(out, MIXTURE), {"mixture": mixture.name, "split": split, "feature": feature,
                                                     "seed": seed, "tasks": entries})
    return Export([os.path.join(out, e["folder"]) for e in entries], [e["weight"] for e in entries],
                  sum(e["documents"] for e in entries), sum(e["tokens"] for e in entries), True)


def as_prepared(config: Config) -> Config:
    """`data.seqio_task` resolved to prepared folders in the data cache (exported on first use)."""
    d = config.data
    if d.prepared or d.weights:
        raise ConfigError("data.seqio_task cannot be combined with data.prepared/data.weights; export the task "
                          "with `jaxlm data from-seqio TASK OUT` and list its folder(s) in data.prepared")
    name = _safe(f"{d.seqio_task}-{d.seqio_split}-{d.seqio_feature}")
    out = os.path.join(os.path.expanduser(d.cache_dir), "seqio", name)
    result = export(d.seqio_task, out, d.seqio_module, d.seqio_split, d.seqio_feature, progress=config.train.progress)
    weights = tuple(result.weights) if result.is_mixture else ()
    return dataclasses.replace(config, data=dataclasses.replace(d, prepared=tuple(result.folders), weights=weights))


def export_pairs(config: Config) -> tuple[str, str]:
    """`data.seqio_task`'s "inputs" and "targets" features exported side by side (objective.kind=seq2seq):
    two prepared folders whose documents align one to one, since both read the task in the same fixed order."""
    d = config.data
    if d.prepared or d.weights:
        raise ConfigError("data.seqio_task cannot be combined with data.prepared/data.weights")
    folders = []
    for feature in ("inputs", "targets"):
        out = os.path.join(os.path.expanduser(d.cache_dir), "seqio", _safe(f"{d.seqio_task}-{d.seqio_split}-{feature}"))
        result = export(d.seqio_task, out, d.seqio_module, d.seqio_split, feature, progress=config.train.progress)
        if result.is_mixture:
            raise ConfigError(f"data.seqio_task={d.seqio_task} is a Mixture; objective.kind=seq2seq trains on one Task's "
                              "inputs and targets (export each task, or train on the mixture's targets)")
        folders.append(out)
    manifests = [prepare._read_json(os.path.join(f, prepare.MANIFEST)) for f in folders]
    if any(m["seqio"]["skipped_empty"] for m in manifests) or manifests[0]["documents"] != manifests[1]["documents"]:
        raise ConfigError(f"seqio task {d.seqio_task} yields empty 'inputs' or 'targets' for some examples, so the two "
                          "features do not pair up; filter such examples out in the task's preprocessors")
    return folders[0], folders[1]
