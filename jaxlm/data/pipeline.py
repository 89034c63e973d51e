"""The grain input pipeline: documents -> tokens -> packed rows -> shuffle -> (mixture) -> per-process batches.

Two kinds of source: raw text (`data.source`, the built-in bible or .txt files, tokenized here and
cached), or folders written by `jaxlm data prepare` (`data.prepared`), packed by `data.packing` and
mixed by `data.weights`. A mixture shuffles each dataset on its own and interleaves them in proportion
(grain's MapDataset.mix), so it is still one random-access dataset with a fixed global order.

Documents are tokenized once (cached), wrapped as `<s> doc </s>` and concatenated. Packed row r is the
window of L+1 tokens starting at r*L (concatenate-and-split). Each row carries segment ids (one per
document piece in the row) and positions that restart at every document, and the loss is masked where
the target belongs to another document.

The global order of rows depends only on the seed, never on the number of processes: process p of P
takes rows p, p+P, p+2P, ... of the shuffled stream, so step s always consumes global rows
[s*B, (s+1)*B), and the step alone fixes where the iterator must be.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Callable

import grain
import jax
import numpy as np

from jaxlm.core.config import ConfigError, Config
from jaxlm.data import corpus, objective_rows, packing, prepared, tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenStream:
    tokens: np.ndarray  # (N,) int32, all documents concatenated
    doc_ids: np.ndarray  # (N,) int32, index of the document each token belongs to


def tokenize(docs: list[str], tok: tokenizer_lib.Tokenizer, cache_path: str | None = None) -> TokenStream:
    if cache_path and os.path.isfile(cache_path):
        with np.load(cache_path) as f:
            return TokenStream(f["tokens"], f["doc_ids"])
    pieces = tok.encode_batch(docs)
    wrapped = [np.asarray([tok.bos_id(), *ids, tok.eos_id()], np.int32) for ids in pieces]
    stream = TokenStream(
        np.concatenate(wrapped) if wrapped else np.zeros(0, np.int32),
        np.repeat(np.arange(len(wrapped), dtype=np.int32), [len(w) for w in wrapped]),
    )
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(cache_path), suffix=".npz", delete=False) as tmp:
            np.savez(tmp, tokens=stream.tokens, doc_ids=stream.doc_ids)
        os.replace(tmp.name, cache_path)
    return stream


class PackedRows:
    """Random-access source of packed rows, so that grain can shuffle globally and resume by index."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.num_rows = max((len(stream.tokens) - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        start = r * self.seq_len
        window = self.stream.tokens[start : start + self.seq_len + 1]
        docs = self.stream.doc_ids[start : start + self.seq_len + 1]
        in_docs = docs[:-1]
        idx = np.arange(self.seq_len)
        starts = np.concatenate([[True], in_docs[1:] != in_docs[:-1]])
        positions = idx - np.maximum.accumulate(np.where(starts, idx, 0))
        return {
            "inputs": window[:-1],
            "targets": window[1:],
            "positions": positions.astype(np.int32),
            "segment_ids": (in_docs - in_docs[0] + 1).astype(np.int32),
            "loss_mask": (docs[1:] == in_docs).astype(np.int32),
        }


@dataclasses.dataclass
class Mixture:
    """Several row sources drawn in proportion to `weights`."""

    sources: list
    weights: list[float]

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)


@dataclasses.dataclass
class Data:
    train: PackedRows | Mixture
    eval: PackedRows | None
    tokenizer_path: str
    vocab_size: int
    # The objective's rows made from the packed ones (grain random_map; None: the packed rows themselves).
    transform: Callable | None = None


def prepare(config: Config) -> Data:
    """Reads the source, gets the tokenizer and token streams (cached) and checks them against the model."""
    d = config.data
    if d.seqio_task:  # exported once into prepared folders; seqio/TensorFlow are imported only here
        from jaxlm.data import seqio_source

        if config.objective.kind == "seq2seq":
            return _pairs(config, *seqio_source.export_pairs(config))
        return _from_prepared(seqio_source.as_prepared(config))
    if d.prepared:
        return _from_prepared(config)
    docs = corpus.documents(d.source)
    train_docs, eval_docs = corpus.split(docs, d.eval_fraction)
    tok, tok_path = tokenizer_lib.get(train_docs, config.model.vocab_size, d.tokenizer_type, d.tokenizer, d.cache_dir,
                                      objective_rows.extra_ids(config))
    if tok.vocab_size() > config.model.vocab_size:
        raise ConfigError(
            f"tokenizer {tok_path} has {tok.vocab_size()} pieces but model.vocab_size={config.model.vocab_size}; "
            f"set model.vocab_size={tok.vocab_size()}"
        )
    fmt = objective_rows.row_format(config, tok)
    cache = os.path.join(os.path.expanduser(d.cache_dir), "tokens")
    key = f"{tokenizer_lib.corpus_hash(docs)}-{tokenizer_lib.file_hash(tok_path)}-{d.eval_fraction}"
    train_stream = tokenize(train_docs, tok, os.path.join(cache, f"{key}-train.npz"))
    eval_stream = tokenize(eval_docs, tok, os.path.join(cache, f"{key}-eval.npz")) if eval_docs else None
    rows = PackedRows(train_stream, fmt.source_length)
    if len(rows) == 0:
        raise ConfigError(f"data.source={d.source!r} has fewer than train.seq_len={config.train.seq_len} tokens")
    eval_rows = PackedRows(eval_stream, fmt.source_length) if eval_stream is not None else None
    log.info("data: %d train rows of %d tokens (%d tokens), %d eval rows%s", len(rows), fmt.source_length,
             len(train_stream.tokens), len(eval_rows) if eval_rows else 0, _made(fmt))
    return Data(rows, eval_rows if eval_rows and len(eval_rows) else None, tok_path, tok.vocab_size(),
                objective_rows.transform(fmt))


def _made(fmt: objective_rows.RowFormat) -> str:
    """What the log says the objective makes of each row."""
    if fmt.kind == "causal":
        return ""
    if fmt.encoder_decoder:
        return f", made into {fmt.kind} rows of {fmt.seq_len} input and {fmt.target_len} target tokens"
    return f", made into {fmt.kind} rows of {fmt.seq_len} tokens"


def _from_prepared(config: Config) -> Data:
    d, seq_len = config.data, config.train.seq_len
    if d.weights and len(d.weights) != len(d.prepared):
        raise ConfigError(f"data.weights has {len(d.weights)} entries for {len(d.prepared)} data.prepared folders; "
                          "give one weight per folder")
    if any(w <= 0 for w in d.weights):
        raise ConfigError(f"data.weights={d.weights} must all be positive")
    datasets = [prepared.open_prepared(p) for p in d.prepared]
    tok_path = prepared.check_tokenizer(datasets, d.tokenizer)
    tok = tokenizer_lib.load(tok_path)
    if tok.vocab_size() > config.model.vocab_size:
        raise ConfigError(f"tokenizer {tok_path} has {tok.vocab_size()} pieces but model.vocab_size="
                          f"{config.model.vocab_size}; set model.vocab_size={tok.vocab_size()}")
    fmt = objective_rows.row_format(config, tok)
    seq_len = fmt.source_length
    rows_of = packing.FirstFitRows if d.packing == "first_fit" else packing.ConcatSplitRows
    train, held_out = [], []
    for ds in datasets:
        train_idx, eval_idx = prepared.split(len(ds.lengths), d.eval_fraction)
        train.append(rows_of(ds.docs(train_idx), seq_len))
        held_out.append(rows_of(ds.docs(eval_idx), seq_len))
        if not len(train[-1]):
            raise ConfigError(f"data.prepared={ds.path} has fewer than train.seq_len={seq_len} tokens")
        log.info("data: %s: %d %s rows of %d tokens, %d eval rows", ds.path, len(train[-1]), d.packing, seq_len,
                 len(held_out[-1]))
    eval_rows = packing.ConcatRows(held_out)
    source = train[0] if len(train) == 1 else Mixture(train, list(d.weights or [1.0] * len(train)))
    return Data(source, eval_rows if len(eval_rows) else None, tok_path, tok.vocab_size(), objective_rows.transform(fmt))


def _pairs(config: Config, inputs_dir: str, targets_dir: str) -> Data:
    """Encoder-decoder rows from aligned inputs and targets folders (a seqio task's two features)."""
    inputs, targets = prepared.open_prepared(inputs_dir), prepared.open_prepared(targets_dir)
    tok_path = prepared.check_tokenizer([inputs, targets], config.data.tokenizer)
    tok = tokenizer_lib.load(tok_path)
    if tok.vocab_size() > config.model.vocab_size:
        raise ConfigError(f"tokenizer {tok_path} has {tok.vocab_size()} pieces but model.vocab_size="
                          f"{config.model.vocab_size}; set model.vocab_size={tok.vocab_size()}")
    seq_len, target_len = config.train.seq_len, objective_rows.target_length(config)
    train_idx, eval_idx = prepared.split(len(inputs.lengths), config.data.eval_fraction)
    rows = lambda idx: packing.PairRows(inputs.docs(idx), targets.docs(idx), seq_len, target_len,
                                        config.model.decoder_start_id)
    train, held_out = rows(train_idx), rows(eval_idx)
    log.info("data: %d (inputs, targets) examples in %d row pairs of %d input and %d target tokens, %d eval rows",
             len(train_idx), len(train), seq_len, target_len, len(held_out))
    return Data(train, held_out if len(held_out) else None, tok_path, tok.vocab_size())


def local_batch_size(global_batch: int, count: int | None = None) -> int:
    count = jax.process_count() if count is None else count
    if global_batch % count:
        raise ConfigError(f"train.batch_size={global_batch} must be divisible by the {count} processes")
    return global_batch // count


def _endless(ds: grain.MapDataset) -> grain.MapDataset:
    """Repeats for about 2**50 rows: finite, because grain's iterator calls len() and the sys.maxsize
    length of an infinite repeat overflows it when the local batch is 1."""
    return ds.repeat(num_epochs=max(1, (1 << 50) // max(len(ds), 1)))


def _fingerprint(rows, global_batch: int, seed: int, transform: Callable | None = None) -> str:
    """What fixes the data order: grain's saved position is only meaningful for the same one."""
    parts = rows.sources if isinstance(rows, Mixture) else [rows]
    weights = rows.weights if isinstance(rows, Mixture) else [1.0]
    layout = ",".join(f"{type(p).__name__}:{len(p)}:{w:g}" for p, w in zip(parts, weights))
    made = f"|{transform.func.__name__.lstrip('_')}" if transform is not None else ""
    return f"{layout}|batch={global_batch}|seed={seed}{made}"


def _shuffled(rows, seed: int) -> grain.MapDataset:
    """The endless, globally shuffled rows (reshuffled every epoch); a mixture shuffles each part."""
    if isinstance(rows, Mixture):
        parts = [_endless(grain.MapDataset.source(r).shuffle(seed=seed + i)) for i, r in enumerate(rows.sources)]
        return grain.MapDataset.mix(parts, rows.weights)
    return _endless(grain.MapDataset.source(rows).shuffle(seed=seed))


class BatchIterator:
    """This process's share of each global batch, from step `start` on, endlessly.

    Its state is grain's iterator state plus where the iterator began. A saved state is used as is when it
    was written with the same number of grain workers (grain's state layout depends on it); otherwise the
    iterator starts at `start`, which is always right because step s reads batch s.
    """

    def __init__(self, rows: PackedRows, global_batch: int, seed: int, workers: int = 0,
                 process: tuple[int, int] | None = None, start: int = 0, saved: dict | None = None,
                 transform: Callable | None = None):
        self.fingerprint = _fingerprint(rows, global_batch, seed, transform)
        if saved is not None and saved.get("workers") != workers:
            log.info("data state was saved with %s grain workers, now %d: positioning by step",
                     saved.get("workers"), workers)
            saved = None
        if saved is not None and saved.get("fingerprint", self.fingerprint) != self.fingerprint:
            log.warning("the data changed since the checkpoint (%s, now %s): continuing at the step's position "
                        "in the new data order", saved.get("fingerprint"), self.fingerprint)
            saved = None
        self.start = saved["start"] if saved else start
        self.workers = workers
        index, count = process or (jax.process_index(), jax.process_count())
        ds = _shuffled(rows, seed)
        if transform is not None:  # drawn per position in the global stream: the same on any process count
            ds = ds.random_map(transform, seed=seed)
        ds = ds[index::count].batch(local_batch_size(global_batch, count))[self.start :]
        it_ds = ds.to_iter_dataset()
        if workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; jaxlm has its own CLI
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        self._it = iter(it_ds)
        if saved:
            self._it.set_state(saved["grain"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return {"start": self.start, "workers": self.workers, "fingerprint": self.fingerprint,
                "grain": self._it.get_state()}


def eval_batches(rows: PackedRows, global_batch: int, num_batches: int,
                 transform: Callable | None = None) -> list[dict[str, np.ndarray]]:
    """The same held-out batches at every evaluation: rows in order, wrapping around if too few (and made
    into the objective's rows with fixed draws)."""
    ds = _endless(grain.MapDataset.source(rows))
    if transform is not None:
        ds = ds.random_map(transform, seed=0)
    ds = ds[jax.process_index() :: jax.process_count()].batch(local_batch_size(global_batch))
    return [ds[i] for i in range(num_batches)]
