"""How a pretraining objective turns the pipeline's packed token rows into training rows, inside grain.

The sources (`pipeline.PackedRows`, `packing.*Rows`) cut the token stream into rows of `source_length`
tokens. For `objective.kind`:
- causal: the rows as they are;
- prefix_lm: a random split of each row's first document: the tokens before it are a bidirectional prefix
  (`prefix_mask`), the loss covers the rest;
- span_corruption: T5's noise spans (`denoise`), ended with EOS. An encoder-decoder row has the corrupted
  inputs in the encoder's row and the targets in the decoder's (`decoder_inputs` are the targets shifted
  right behind `model.decoder_start_id`); a decoder-only row (prefix-LM) is inputs then targets, the inputs
  its prefix. The source length is the longest whose corruption still fits, as T5 chooses it;
- mlm: BERT's masking (`denoise.mask_tokens`); the targets are the original tokens at the masked positions;
- ul2: UL2's mixture of denoisers (`UL2`), one drawn per row: regular and extreme span corruption, and
  sequential denoising (the row's last quarter as the targets of the rest), laid out as span corruption's
  rows, whose source length and (encoder-decoder) target length fit every denoiser. UL2's mode tokens are
  left out (the tokenizer would need pieces for them).

The draws come from grain's `random_map`, whose generator is seeded by the pipeline seed and the row's
index in the shuffled stream: a resumed run makes exactly the draws the uninterrupted one made, and a
row seen again in a later epoch gets new noise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

from jaxlm.core.config import Config, ConfigError
from jaxlm.data import denoise

Row = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RowFormat:
    kind: str
    seq_len: int  # the encoder's row (or the decoder-only row)
    target_len: int  # the decoder's row (encoder-decoder)
    source_length: int  # tokens per source row
    encoder_decoder: bool
    eos: int
    decoder_start: int = 0
    sentinels: tuple[int, ...] = ()
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    mask_id: int = -1
    mask_rate: float = 0.15
    vocab_size: int = 0
    special: tuple[int, ...] = ()
    denoisers: tuple = ()  # ul2: (noise density, mean span length) pairs and "S"


# UL2's denoisers (Tay et al. 2022, section 3.1.2): R (noise 15%, spans of 3 and 8), X (50% in spans of 3
# and 8, 15% and 50% in spans of 64), S (prefix-LM with the last SEQUENTIAL_TARGETS of the row as targets).
UL2 = ((0.15, 3.0), (0.15, 8.0), (0.5, 3.0), (0.5, 8.0), (0.15, 64.0), (0.5, 64.0), "S")
SEQUENTIAL_TARGETS = 0.25


def corrupted_lengths(raw: int, density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths of `raw` span-corrupted tokens, each with one sentinel per span and an EOS."""
    noise, spans = denoise.span_counts(raw, density, mean_span)
    spans = min(spans, noise, raw - noise)
    return raw - noise + spans + 1, noise + spans + 1


def denoised_lengths(raw: int, denoiser) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, that a denoiser (`UL2`'s entries) makes of `raw` tokens."""
    if denoiser == "S":
        targets = sequential_split(raw)
        return raw - targets + 1, targets + 1
    return corrupted_lengths(raw, *denoiser)


def sequential_split(length: int) -> int:
    """How many of a row's last tokens the S-denoiser makes targets (at least one, never all)."""
    return min(max(int(round(length * SEQUENTIAL_TARGETS)), 1), length - 1)


def span_source_length(fits: Callable[[int, int], bool], density: float, mean_span: float,
                       denoisers: tuple = ()) -> int:
    """The longest raw length whose corrupted (inputs, targets) lengths `fits` accepts, for every one of
    `denoisers` if given (T5's `random_spans_helper`, searching up from 2)."""
    denoisers = denoisers or ((density, mean_span),)
    ok = lambda raw: all(fits(*denoised_lengths(raw, d)) for d in denoisers)
    raw = 2
    if not ok(raw):
        raise ConfigError("train.seq_len is too short for span corruption: raise it")
    while ok(raw + 1):
        raw += 1
    return raw


def sentinel_ids(tok, count: int) -> tuple[int, ...]:
    """T5's sentinels: the tokenizer's last `count` ids, `<extra_id_0>` the very last."""
    ids = denoise.t5_sentinels(tok.vocab_size(), count)
    missing = [i for n, i in enumerate(ids) if tok.id_to_piece(i) != f"<extra_id_{n}>"]
    if missing:
        raise ConfigError(f"the tokenizer does not end with {count} sentinel pieces <extra_id_0>..<extra_id_{count - 1}> "
                          f"(id {missing[0]} is {tok.id_to_piece(missing[0])!r}); train it with `jaxlm tokenizer train "
                          f"--extra-ids {count}`, leave data.tokenizer empty, or lower objective.extra_ids")
    return tuple(ids)


MASK_PIECES = ("[MASK]", "<mask>", "<extra_id_0>")


def mask_id(tok) -> int:
    """The id of the tokenizer's mask piece (BERT's [MASK], RoBERTa's <mask>, or a T5 sentinel)."""
    for i in reversed(range(tok.vocab_size())):
        if tok.id_to_piece(i) in MASK_PIECES:
            return i
    raise ConfigError(f"the tokenizer has no mask piece ({', '.join(MASK_PIECES)}) for objective.kind=mlm; train "
                      "it with `jaxlm tokenizer train --extra-ids 1` or leave data.tokenizer empty")


def extra_ids(config: Config) -> int:
    """The sentinel pieces a tokenizer trained for this run needs."""
    kind = config.objective.kind
    return config.objective.extra_ids if kind in ("span_corruption", "ul2") else 1 if kind == "mlm" else 0


def row_format(config: Config, tok) -> RowFormat:
    """The rows `config.objective` trains on, checked against the tokenizer."""
    o, m, seq_len = config.objective, config.model, config.train.seq_len
    base = dict(kind=o.kind, seq_len=seq_len, target_len=target_length(config), source_length=seq_len,
                encoder_decoder=m.encoder_decoder, eos=tok.eos_id(), decoder_start=m.decoder_start_id)
    if o.kind in ("span_corruption", "ul2"):
        if m.encoder_decoder:
            fits = lambda i, t: i <= seq_len and t <= base["target_len"]
        else:
            fits = lambda i, t: i + t <= seq_len + 1  # the row's inputs are the whole sequence but its last token
        denoisers = UL2 if o.kind == "ul2" else ()
        raw = span_source_length(fits, o.noise_density, o.mean_span_length, denoisers)
        return RowFormat(**{**base, "source_length": raw}, sentinels=sentinel_ids(tok, o.extra_ids),
                         noise_density=o.noise_density, mean_span_length=o.mean_span_length, denoisers=denoisers)
    if o.kind == "mlm":
        special = tuple(i for i in (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.unk_id()) if i >= 0)
        mid = mask_id(tok)
        return RowFormat(**base, mask_id=mid, mask_rate=o.mask_rate, vocab_size=tok.vocab_size(),
                         special=(*special, mid))
    return RowFormat(**base)


def target_length(config: Config) -> int:
    """The decoder's row length of an encoder-decoder (T5's for span corruption: the targets of a source
    that fills the encoder's row)."""
    o, seq_len = config.objective, config.train.seq_len
    if o.target_len or not config.model.encoder_decoder:
        return o.target_len or seq_len
    if o.kind not in ("span_corruption", "ul2"):
        return seq_len
    denoisers = UL2 if o.kind == "ul2" else ((o.noise_density, o.mean_span_length),)
    raw = span_source_length(lambda i, t: i <= seq_len, o.noise_density, o.mean_span_length, denoisers)
    return max(denoised_lengths(raw, d)[1] for d in denoisers)


def transform(fmt: RowFormat) -> Callable[[Row, np.random.Generator], Row] | None:
    """The grain random_map function of `fmt` (picklable, for grain's worker processes), or None for causal
    rows."""
    make = MAKERS.get(fmt.kind)
    return None if make is None else functools.partial(make, fmt)


def _tokens(row: Row) -> np.ndarray:
    """The row's tokens (a first-fit row's padding left out)."""
    return row["inputs"][row["segment_ids"] > 0]


def _prefix_lm(fmt: RowFormat, row: Row, rng: np.random.Generator) -> Row:
    first = int(np.sum(row["segment_ids"] == row["segment_ids"][0]))
    split = int(rng.integers(1, first)) if first > 1 else 0  # tokens [0, split) are the prefix
    idx = np.arange(len(row["inputs"]))
    # Targets at i predict token i + 1: the prefix's own tokens are given, so its loss starts at split - 1.
    return {**row, "prefix_mask": (idx < split).astype(np.int32),
            "loss_mask": (row["loss_mask"] * (idx >= split - 1)).astype(np.int32)}


def _pad(a: np.ndarray, length: int) -> np.ndarray:
    return np.pad(a, (0, length - len(a))).astype(np.int32)


def _filled(length: int, used: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, segment ids) of a row whose first `used` tokens are one example."""
    return np.arange(length, dtype=np.int32), (np.arange(length) < used).astype(np.int32)


def _span_corruption(fmt: RowFormat, row: Row, rng: np.random.Generator) -> Row:
    tokens = _tokens(row)
    mask = denoise.noise_mask(len(tokens), fmt.noise_density, fmt.mean_span_length, rng)
    return _denoised_row(fmt, *denoise.corrupt(tokens, mask, fmt.sentinels))


def _ul2(fmt: RowFormat, row: Row, rng: np.random.Generator) -> Row:
    tokens = _tokens(row)
    denoiser = fmt.denoisers[int(rng.integers(len(fmt.denoisers)))]
    if denoiser == "S":
        split = len(tokens) - sequential_split(len(tokens))
        return _denoised_row(fmt, tokens[:split], tokens[split:])
    mask = denoise.noise_mask(len(tokens), *denoiser, rng)
    return _denoised_row(fmt, *denoise.corrupt(tokens, mask, fmt.sentinels))


def _denoised_row(fmt: RowFormat, inputs: np.ndarray, targets: np.ndarray) -> Row:
    """The training row of (inputs, targets), each ended with EOS: an encoder-decoder's pair of rows, or a
    decoder-only row of inputs (its bidirectional prefix) then targets."""
    inputs, targets = np.append(inputs, fmt.eos), np.append(targets, fmt.eos)
    if fmt.encoder_decoder:
        positions, segments = _filled(fmt.seq_len, len(inputs))
        dec_positions, dec_segments = _filled(fmt.target_len, len(targets))
        return {"inputs": _pad(inputs, fmt.seq_len), "positions": positions, "segment_ids": segments,
                "decoder_inputs": _pad(np.concatenate([[fmt.decoder_start], targets[:-1]]), fmt.target_len),
                "decoder_positions": dec_positions, "decoder_segment_ids": dec_segments,
                "targets": _pad(targets, fmt.target_len), "loss_mask": dec_segments.copy()}
    sequence = np.concatenate([inputs, targets])
    positions, segments = _filled(fmt.seq_len, len(sequence) - 1)
    idx = np.arange(fmt.seq_len)
    return {"inputs": _pad(sequence[:-1], fmt.seq_len), "targets": _pad(sequence[1:], fmt.seq_len),
            "positions": positions, "segment_ids": segments,
            "prefix_mask": (idx < len(inputs)).astype(np.int32),
            "loss_mask": ((idx >= len(inputs) - 1) & (segments > 0)).astype(np.int32)}


def _mlm(fmt: RowFormat, row: Row, rng: np.random.Generator) -> Row:
    real = row["segment_ids"] > 0
    inputs, loss_mask = denoise.mask_tokens(row["inputs"], fmt.mask_id, fmt.vocab_size, fmt.special, fmt.mask_rate, rng)
    inputs = np.where(real, inputs, row["inputs"])
    return {"inputs": inputs.astype(np.int32), "targets": row["inputs"].astype(np.int32),
            "positions": row["positions"], "segment_ids": row["segment_ids"],
            "loss_mask": (loss_mask * real).astype(np.int32)}


MAKERS = {"prefix_lm": _prefix_lm, "span_corruption": _span_corruption, "mlm": _mlm, "ul2": _ul2}
