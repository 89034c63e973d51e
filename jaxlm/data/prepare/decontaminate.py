"""Decontamination: drop training documents that share a long n-gram with an evaluation set.

N-grams are of units (lower-cased words, or CJK characters), as in GPT-3's 13-gram overlap check. Only
8-byte hashes of the eval n-grams are held in memory.
"""

from __future__ import annotations

import hashlib

from jaxlm.data.prepare.units import units


def _hashes(text: str, n: int) -> set[bytes]:
    items = units(text.lower())
    return {hashlib.blake2b(" ".join(items[i : i + n]).encode("utf-8"), digest_size=8).digest()
            for i in range(len(items) - n + 1)}


class Decontaminator:
    def __init__(self, eval_docs, n: int):
        self.n = n
        self.ngrams: set[bytes] = set()
        self.eval_docs = 0
        for doc in eval_docs:
            self.ngrams |= _hashes(doc, n)
            self.eval_docs += 1

    def is_contaminated(self, text: str) -> bool:
        return not self.ngrams.isdisjoint(_hashes(text, self.n))
