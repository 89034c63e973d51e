"""Packing tokenized documents into fixed-length rows, as random-access sources that grain can shuffle.

Two layouts over a `DocStore` of documents (each `<s> ... </s>`):
- concatenate-and-split (`ConcatSplitRows`): all documents as one stream; row r is the window of L+1
  tokens at r*L, so every token is trained on and documents continue across rows;
- first-fit (`FirstFitRows`): documents (split into pieces of at most L tokens when longer) go into the
  first row with room, longest first; rows are padded and no document is cut between rows unless it is
  longer than a row.

Every row has segment ids (1, 2, ... per document piece, 0 for padding), positions that restart at each
piece, and a loss mask that is 0 where the target belongs to another piece or to padding; attention is
restricted to equal segment ids by the model, so nothing attends across documents.
"""

from __future__ import annotations

import numpy as np


class DocStore:
    """Documents by local index: `indices` selects records of an ArrayRecord source (or any sequence of
    token arrays), `lengths` are their token counts."""

    def __init__(self, source, indices: np.ndarray, lengths: np.ndarray):
        self.source, self.indices, self.lengths = source, indices, lengths

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        record = self.source[int(self.indices[i])]
        return np.frombuffer(record, "<i4").astype(np.int32) if isinstance(record, bytes) else np.asarray(record)


def make_row(tokens: np.ndarray, pieces: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs from L+1 tokens and the piece (document) id of each, -1 for padding."""
    piece = pieces[:-1]  # (L,) the piece each input token belongs to
    idx = np.arange(len(piece))
    starts = np.concatenate([[True], piece[1:] != piece[:-1]])
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    segments = np.cumsum(starts & (piece >= 0))
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "positions": positions.astype(np.int32),
        "segment_ids": np.where(piece >= 0, segments, 0).astype(np.int32),
        "loss_mask": ((pieces[1:] == piece) & (piece >= 0)).astype(np.int32),
    }


class ConcatSplitRows:
    def __init__(self, docs: DocStore, seq_len: int):
        self.docs, self.seq_len = docs, seq_len
        self.offsets = np.concatenate([[0], np.cumsum(docs.lengths, dtype=np.int64)])
        self.num_rows = max(int(self.offsets[-1] - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        start, end = r * self.seq_len, r * self.seq_len + self.seq_len + 1
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        tokens, ids = [], []
        while self.offsets[i] < end:
            doc = self.docs[i]
            lo, hi = max(start - self.offsets[i], 0), min(end - self.offsets[i], len(doc))
            tokens.append(doc[lo:hi])
            ids.append(np.full(hi - lo, i, np.int64))
            i += 1
        return make_row(np.concatenate(tokens), np.concatenate(ids))


def first_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Bin of each item under first-fit decreasing, in O(n log n) with a max-tree of remaining room."""
    order = np.argsort(-lengths, kind="stable")
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = [capacity] * (2 * size)  # room[size + b]: space left in bin b; inner nodes hold the max below
    bins = np.zeros(len(lengths), np.int64)
    for item in order:
        need = int(lengths[item])
        node = 1
        while node < size:  # descend to the leftmost bin with room
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        bins[item] = node - size
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


class FirstFitRows:
    def __init__(self, docs: DocStore, seq_len: int):
        self.docs, self.seq_len = docs, seq_len
        lengths = np.asarray(docs.lengths, np.int64)
        # Pieces: documents cut every seq_len tokens.
        counts = np.maximum((lengths + seq_len - 1) // seq_len, 1)
        doc = np.repeat(np.arange(len(lengths)), counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        start = (np.arange(len(doc)) - np.repeat(first, counts)) * seq_len
        length = np.minimum(lengths[doc] - start, seq_len)
        bins = first_fit(length, seq_len)
        order = np.lexsort((np.arange(len(bins)), bins))  # pieces grouped by bin, in placement order
        self.piece_doc, self.piece_start, self.piece_len = doc[order], start[order], length[order]
        self.num_rows = int(bins.max()) + 1 if len(bins) else 0
        self.row_ptr = np.searchsorted(bins[order], np.arange(self.num_rows + 1))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        window = np.zeros(self.seq_len + 1, np.int32)
        ids = np.full(self.seq_len + 1, -1, np.int64)
        at = 0
        for p in range(self.row_ptr[r], self.row_ptr[r + 1]):
            s, n = self.piece_start[p], self.piece_len[p]
            window[at : at + n] = self.docs[int(self.piece_doc[p])][s : s + n]
            ids[at : at + n] = p
            at += n
        return make_row(window, ids)


class ConcatRows:
    """Several row sources one after the other (used for held-out rows of several datasets)."""

    def __init__(self, parts: list):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        i = int(np.searchsorted(self.offsets, r, side="right")) - 1
        return self.parts[i][r - int(self.offsets[i])]


class ArrayRows:
    """Rows already in memory ({key: (R, ...) array}, e.g. packed chats or preference pairs), as a
    random-access source that grain can shuffle like any other."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.num_rows = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        return {k: v[r] for k, v in self.arrays.items()}


def first_fit_pairs(in_lengths: np.ndarray, out_lengths: np.ndarray, in_capacity: int, out_capacity: int) -> np.ndarray:
    """Bin of each (input, target) pair under first-fit decreasing (by input length) where a bin is a pair
    of rows, an encoder's and a decoder's, and an item fits only if both of its parts do."""
    order = np.argsort(-np.asarray(in_lengths), kind="stable")
    in_room, out_room = np.zeros(0, np.int64), np.zeros(0, np.int64)
    bins = np.zeros(len(in_lengths), np.int64)
    for item in order:
        fits = np.flatnonzero((in_room >= in_lengths[item]) & (out_room >= out_lengths[item]))
        if len(fits):
            b = int(fits[0])
        else:
            b = len(in_room)
            in_room, out_room = np.append(in_room, in_capacity), np.append(out_room, out_capacity)
        bins[item] = b
        in_room[b] -= in_lengths[item]
        out_room[b] -= out_lengths[item]
    return bins


PAIR_KEYS = ("inputs", "positions", "segment_ids", "decoder_inputs", "decoder_positions", "decoder_segment_ids",
             "targets", "loss_mask")


def pair_row(pairs, seq_len: int, target_len: int, start: int = 0) -> dict[str, np.ndarray]:
    """One encoder-decoder row pair holding `pairs` of (input ids, target ids), in order: example k has
    segment id k + 1 on both sides (the decoder cross-attends to its own input only), positions from 0,
    the decoder reads its target shifted right behind `start`, and the loss covers every target token.
    Padding is segment 0 with no loss."""
    out = {k: np.zeros(target_len if k.startswith("decoder") or k in ("targets", "loss_mask") else seq_len, np.int32)
           for k in PAIR_KEYS}
    at_in = at_out = 0
    for seg, (inputs, targets) in enumerate(pairs, 1):
        m, n = len(inputs), len(targets)
        out["inputs"][at_in:at_in + m], out["positions"][at_in:at_in + m] = inputs, np.arange(m)
        out["segment_ids"][at_in:at_in + m] = seg
        out["decoder_inputs"][at_out:at_out + n] = np.concatenate([[start], targets[:-1]])
        out["decoder_positions"][at_out:at_out + n] = np.arange(n)
        out["decoder_segment_ids"][at_out:at_out + n] = seg
        out["targets"][at_out:at_out + n], out["loss_mask"][at_out:at_out + n] = targets, 1
        at_in, at_out = at_in + m, at_out + n
    return out


class PairRows:
    """Aligned (inputs, targets) documents, e.g. a seqio task's two features, packed first-fit into
    encoder-decoder row pairs (`first_fit_pairs`, `pair_row`). An example longer than its row is cut to
    it, as T5X trims features to their lengths."""

    def __init__(self, inputs: DocStore, targets: DocStore, seq_len: int, target_len: int, start: int = 0):
        self.inputs, self.targets, self.seq_len, self.target_len, self.start = inputs, targets, seq_len, target_len, start
        in_len = np.minimum(np.asarray(inputs.lengths, np.int64), seq_len)
        out_len = np.minimum(np.asarray(targets.lengths, np.int64), target_len)
        bins = first_fit_pairs(in_len, out_len, seq_len, target_len)
        self.order = np.lexsort((np.arange(len(bins)), bins))
        self.num_rows = int(bins.max()) + 1 if len(bins) else 0
        self.row_ptr = np.searchsorted(bins[self.order], np.arange(self.num_rows + 1))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        items = self.order[self.row_ptr[r]:self.row_ptr[r + 1]]
        pairs = [(self.inputs[int(i)][: self.seq_len], self.targets[int(i)][: self.target_len]) for i in items]
        return pair_row(pairs, self.seq_len, self.target_len, self.start)
