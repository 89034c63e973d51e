"""Sequence-to-sequence finetuning data for an encoder-decoder: `{"input", "target"}` rows, each side
ended with EOS, packed into pairs of rows.

An example's input goes to the encoder's row and its target to the decoder's row of the same pair, with one
segment id on both sides, so that the decoder cross-attends to its own input only (`jaxlm.model.t5`).
Positions restart at every example. The decoder reads the target shifted right behind
`model.decoder_start_id`; the loss covers every target token, EOS included. Rows that cannot be used are
counted by reason, as for chat SFT (`sft.Report`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxlm.data import packing
from jaxlm.training import sft

def encode_pair(row, encode: Callable[[str], list[int]], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, target ids) of one row, each ended with EOS. Raises ValueError for a malformed row."""
    if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("target"), str):
        raise ValueError("row has no 'input' and 'target' strings")
    if not row["target"].strip():
        raise ValueError("empty target")
    return (np.asarray([*encode(row["input"]), eos], np.int32), np.asarray([*encode(row["target"]), eos], np.int32))


def build_examples(rows, encode: Callable, eos: int, seq_len: int, target_len: int, report: sft.Report):
    """The usable (inputs, targets) examples: both sides within their rows; the rest counted."""
    out = []
    for where, row in rows:
        try:
            inputs, targets = encode_pair(row, encode, eos)
        except ValueError as e:
            report.reject(str(e), where)
            continue
        if len(inputs) > seq_len:
            report.reject(f"input longer than train.seq_len={seq_len}", where)
        elif len(targets) > target_len:
            report.reject(f"target longer than the decoder's {target_len} tokens (objective.target_len)", where)
        else:
            report.used += 1
            out.append((inputs, targets))
    return out


def pack(examples, seq_len: int, target_len: int, pack_rows: bool = True, start: int = 0) -> dict[str, np.ndarray]:
    """Pairs of rows (R, seq_len) and (R, target_len): first-fit bins of examples where both sides fit
    (`packing.first_fit_pairs`), or one example per row pair without packing (`packing.pair_row`).
    `start`: the decoder's start token."""
    in_lengths = np.asarray([len(i) for i, _ in examples], np.int64)
    out_lengths = np.asarray([len(t) for _, t in examples], np.int64)
    bins = (packing.first_fit_pairs(in_lengths, out_lengths, seq_len, target_len) if pack_rows
            else np.arange(len(examples)))
    n = int(bins.max()) + 1 if len(bins) else 0
    members = [[] for _ in range(n)]
    for example, r in zip(examples, bins):
        members[r].append(example)
    rows = [packing.pair_row(pairs, seq_len, target_len, start) for pairs in members]
    return {k: np.stack([row[k] for row in rows]) if rows else np.zeros((0, 1), np.int32) for k in packing.PAIR_KEYS}
