"""Exact and near-duplicate removal. The first occurrence of a document is kept, later copies dropped.

Exact: a SHA-1 of the text with case and whitespace folded. Near: MinHash signatures of unit n-gram
shingles (datasketch), bucketed by LSH bands; a document is a near duplicate when some earlier kept
document in a shared bucket has an estimated Jaccard similarity at or above the threshold. Signing is
linear in the corpus and LSH lookups touch only bucket mates, so the whole pass is close to linear.
"""

from __future__ import annotations

import hashlib

from datasketch import LeanMinHash, MinHash, MinHashLSH

from jaxlm.core.config import ConfigError
from jaxlm.data.prepare.units import units


class ExactDedup:
    def __init__(self):
        self.seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        key = hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).digest()
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


def shingles(text: str, n: int) -> set[bytes]:
    items = units(text.lower())
    if len(items) <= n:
        return {" ".join(items).encode("utf-8")}
    return {" ".join(items[i : i + n]).encode("utf-8") for i in range(len(items) - n + 1)}


def signature(text: str, n: int, perms: int, seed: int = 1) -> LeanMinHash:
    m = MinHash(num_perm=perms, seed=seed)
    m.update_batch(list(shingles(text, n)))
    return LeanMinHash(m)


class NearDedup:
    def __init__(self, ngram: int, perms: int, bands: int, threshold: float):
        if perms % bands:
            raise ConfigError(f"minhash_perms={perms} must be divisible by minhash_bands={bands}")
        self.ngram, self.perms, self.threshold = ngram, perms, threshold
        self.lsh = MinHashLSH(num_perm=perms, params=(bands, perms // bands))
        self.kept: list[LeanMinHash] = []

    def is_duplicate(self, text: str) -> bool:
        return self.is_duplicate_signature(signature(text, self.ngram, self.perms))

    def is_duplicate_signature(self, sig: LeanMinHash) -> bool:
        for key in self.lsh.query(sig):
            if self.kept[key].jaccard(sig) >= self.threshold:
                return True
        self.lsh.insert(len(self.kept), sig, check_duplication=False)
        self.kept.append(sig)
        return False
