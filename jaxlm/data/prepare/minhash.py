"""MinHash near-duplicate detection as pure array functions, so one process or a cluster computes it alike.

    signatures (per document) -> band keys (per document and band) -> buckets: documents sharing a band key
    -> candidate edges inside each bucket -> edges verified by estimated Jaccard >= threshold
    -> connected components -> the lowest document id of each component is kept, the rest are duplicates

Signatures are datasketch's (SHA-1 shingle hashes, seeded permutations) over unit n-gram shingles. A bucket of
k documents gives at most 2(k-1) candidate edges: each member to the bucket's first member and to its
predecessor in id order. A bucket of copies of one text is then covered by the star, and a chain of drifting
edits (A~B, B~C, A!~C) by the predecessor edges, without the k^2 pairs a boilerplate bucket would cost.
Keeping the lowest id of a component (not "the first document unless an earlier kept one is similar") makes
the result independent of processing order, which is what lets workers compute it in any order.
"""

from __future__ import annotations

import numpy as np
from datasketch import MinHash

from jaxlm.data.prepare.units import units

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio): multiplicative mixing


def shingles(text: str, n: int) -> set[bytes]:
    items = units(text.lower())
    if len(items) <= n:
        return {" ".join(items).encode("utf-8")}
    return {" ".join(items[i : i + n]).encode("utf-8") for i in range(len(items) - n + 1)}


def signatures(texts: list[str], ngram: int, perms: int, seed: int = 1) -> np.ndarray:
    """(len(texts), perms) uint32 MinHash signatures."""
    out = np.empty((len(texts), perms), np.uint32)
    for i, text in enumerate(texts):
        m = MinHash(num_perm=perms, seed=seed)
        m.update_batch(list(shingles(text, ngram)))
        out[i] = m.hashvalues
    return out


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """(N, bands) uint64: each band's rows mixed into one key, with the band's index so that equal rows in
    different bands never share a bucket."""
    n, perms = sigs.shape
    rows = perms // bands
    keys = np.empty((n, bands), np.uint64)
    with np.errstate(over="ignore"):  # wrapping multiplication is the point
        for b in range(bands):
            h = np.full(n, np.uint64(b + 1) * _MIX, np.uint64)
            for r in range(rows):
                h = (h ^ sigs[:, b * rows + r].astype(np.uint64)) * _MIX
                h ^= h >> np.uint64(29)
            keys[:, b] = h
    return keys


def partition_of(keys: np.ndarray, parts: int) -> np.ndarray:
    """Which of `parts` partitions each uint64 key (or int64 id) goes to."""
    mixed = keys.astype(np.uint64, copy=False)
    with np.errstate(over="ignore"):
        mixed = (mixed * _MIX) >> np.uint64(40)
    return (mixed % np.uint64(parts)).astype(np.int64)


def candidate_edges(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(E, 2) int64 edges (lower id first, sorted, unique) among the documents sharing a key."""
    order = np.lexsort((ids, keys))
    keys, ids = keys[order], ids[order]
    if len(keys) < 2:
        return np.zeros((0, 2), np.int64)
    same = keys[1:] == keys[:-1]  # same[i]: record i+1 is in the bucket of record i
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    first = ids[starts][np.cumsum(np.concatenate([[True], ~same])) - 1]  # each record's bucket's first id
    members = np.flatnonzero(same) + 1
    edges = np.concatenate([np.stack([first[members], ids[members]], 1),
                            np.stack([ids[members - 1], ids[members]], 1)])
    edges = edges[edges[:, 0] != edges[:, 1]]
    return np.unique(np.sort(edges, 1), axis=0) if len(edges) else np.zeros((0, 2), np.int64)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of signature rows: the fraction of equal permutation minima."""
    return (a == b).mean(axis=-1)


def verify(edges: np.ndarray, lookup, threshold: float) -> np.ndarray:
    """The edges whose documents' signatures (from `lookup(ids) -> sigs`) agree at or above `threshold`."""
    if not len(edges):
        return edges
    return edges[similarity(lookup(edges[:, 0]), lookup(edges[:, 1])) >= threshold]


def components(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, labels): every node on an edge, sorted, and the lowest id of its connected component. Union-find
    in one process; `propagate_round` computes the same labels over partitions."""
    nodes = np.unique(edges)
    parent = np.arange(len(nodes))
    index = np.searchsorted(nodes, edges)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in index:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the lower index (= lower id) is the root
    return nodes, nodes[[root(i) for i in range(len(nodes))]]


def propagate_round(edges: np.ndarray, nodes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One round of min-label propagation: each edge offers each end the other end's label. `labels` holds the
    current label of every node in `nodes` (sorted) that appears in `edges`. Returns (M, 2) (node, offer)."""
    if not len(edges):
        return np.zeros((0, 2), np.int64)
    lab = labels[np.searchsorted(nodes, edges)]
    return np.concatenate([np.stack([edges[:, 0], lab[:, 1]], 1), np.stack([edges[:, 1], lab[:, 0]], 1)])


def apply_offers(nodes: np.ndarray, labels: np.ndarray, offers: np.ndarray) -> tuple[np.ndarray, bool]:
    """New labels: each node's lowest of its own label and its offers; and whether any label changed."""
    new = labels.copy()
    if len(offers):
        np.minimum.at(new, np.searchsorted(nodes, offers[:, 0]), offers[:, 1])
    return new, bool((new != labels).any())


def near_duplicates(ids: np.ndarray, sigs: np.ndarray, bands: int, threshold: float) -> np.ndarray:
    """The whole pass in one process: the sorted ids (of `ids`, sorted ascending) that are near duplicates of a
    lower id."""
    keys = band_keys(sigs, bands)
    edges = candidate_edges(keys.reshape(-1), np.repeat(ids, bands))
    edges = verify(edges, lambda x: sigs[np.searchsorted(ids, x)], threshold)
    nodes, labels = components(edges)
    return nodes[labels != nodes]
