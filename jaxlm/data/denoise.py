"""Denoising objectives' corruption on token id arrays: T5's span corruption, as the T5 paper and its
preprocessors define it, and BERT's masked-LM masking.

A row of L tokens gets round(L x noise_density) noise tokens in round(noise tokens / mean_span_length)
spans. The noise and the non-noise tokens are each split into that many non-empty spans at random, and the
spans alternate, non-noise first. The inputs keep the non-noise spans and put one sentinel in place of each
noise span; the targets are each sentinel followed by the span it hides. Sentinels are the vocabulary's extra
ids, the last ones first: `<extra_id_0>` is the vocabulary's last id (`t5_sentinels`).

BERT's masking (`mlm_mask`) picks `rate` of a row's maskable tokens (never its special ones) for the loss
and, of those, replaces 80% with the mask id, 10% with a random token and leaves 10% as they are.

Everything drawn for a row follows from (seed, row index), so a pipeline that corrupts row i always corrupts
it the same way: a resumed run sees the very same spans and masks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxlm.core.config import ConfigError


def t5_sentinels(vocab_size: int, count: int) -> list[int]:
    """The ids of `<extra_id_0>` .. `<extra_id_{count-1}>` in a T5 vocabulary of `vocab_size` ids."""
    return [vocab_size - 1 - i for i in range(count)]


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a row of `length` tokens, as T5 rounds them."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return noise, max(int(round(noise / mean_span_length)), 1)


def _segment(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `segments` non-empty pieces that add up to `items`, uniformly at random."""
    cuts = np.sort(rng.choice(np.arange(1, items), segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [items]]))


def noise_mask(length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator) -> np.ndarray:
    """(length,) bool: True on noise tokens, in spans that alternate with non-noise ones, non-noise first."""
    if length < 2:
        raise ConfigError(f"span corruption needs rows of at least 2 tokens, got {length}")
    noise, spans = span_counts(length, noise_density, mean_span_length)
    spans = min(spans, noise, length - noise)  # every span non-empty
    lengths = np.stack([_segment(length - noise, spans, rng), _segment(noise, spans, rng)], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), lengths)


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of `tokens` with the noise spans of `mask` replaced by sentinels, in order."""
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    if len(starts) > len(sentinels):
        raise ConfigError(f"span corruption needs {len(starts)} sentinel ids for a row but the vocabulary has "
                          f"{len(sentinels)}; train the tokenizer with more (jaxlm tokenizer train --extra-ids N) "
                          "or lower the noise density / raise the mean span length")
    sentinel_at = np.full(len(tokens), -1, np.int64)
    sentinel_at[starts] = np.asarray(sentinels, np.int64)[: len(starts)]
    inputs = np.where(sentinel_at >= 0, sentinel_at, tokens)[~mask | (sentinel_at >= 0)]
    pieces = [np.concatenate([[sentinel_at[s]], tokens[s:e]]) for s, e in zip(starts, _ends(mask, starts))]
    targets = np.concatenate(pieces) if pieces else np.zeros(0, tokens.dtype)
    return inputs.astype(tokens.dtype), targets.astype(tokens.dtype)


def _ends(mask: np.ndarray, starts: np.ndarray) -> list[int]:
    """Where each noise span that begins at `starts` ends (exclusive)."""
    ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]])) + 1
    return ends[: len(starts)].tolist()


def span_corruption(tokens: np.ndarray, index: int, seed: int, sentinels: Sequence[int], noise_density: float = 0.15,
                    mean_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of row `index`: its noise drawn from (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    return corrupt(tokens, noise_mask(len(tokens), noise_density, mean_span_length, rng), sentinels)


def uncorrupt(inputs: np.ndarray, targets: np.ndarray, sentinels: Sequence[int]) -> np.ndarray:
    """The original tokens from (inputs, targets): each sentinel in the inputs replaced by what follows it
    in the targets."""
    hidden, current = {}, None
    for t in targets.tolist():
        if t in sentinels:
            current = hidden.setdefault(t, [])
        elif current is not None:
            current.append(t)
    out = []
    for t in inputs.tolist():
        out.extend(hidden.get(t, []) if t in hidden else [t])
    return np.asarray(out, inputs.dtype)


def mlm_mask(tokens: np.ndarray, index: int, seed: int, mask_id: int, vocab_size: int, special: Sequence[int] = (),
             rate: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, loss mask) of row `index` for BERT's masked LM: round(rate x maskable tokens) positions (at
    least one) chosen uniformly among the tokens not in `special`; of them 80% become `mask_id`, 10% a
    random non-special id, 10% stay. The targets are `tokens` themselves, read where the loss mask is 1."""
    rng = np.random.default_rng([seed, index, 1])  # another stream than span corruption's for the same row
    return mask_tokens(tokens, mask_id, vocab_size, special, rate, rng)


def mask_tokens(tokens: np.ndarray, mask_id: int, vocab_size: int, special: Sequence[int], rate: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`mlm_mask` with the draws from `rng`."""
    maskable = np.flatnonzero(~np.isin(tokens, np.asarray(special, tokens.dtype)))
    if not len(maskable):
        return tokens.copy(), np.zeros(len(tokens), np.int32)
    chosen = rng.choice(maskable, max(1, int(round(rate * len(maskable)))), replace=False)
    kind = rng.random(len(chosen))
    inputs = tokens.copy()
    inputs[chosen[kind < 0.8]] = mask_id
    randomised = chosen[(kind >= 0.8) & (kind < 0.9)]
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special, np.int64))
    inputs[randomised] = rng.choice(allowed, len(randomised))
    loss_mask = np.zeros(len(tokens), np.int32)
    loss_mask[chosen] = 1
    return inputs, loss_mask
