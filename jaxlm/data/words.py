"""A built-in verifiable task for learning from rewards: say something in a given number of words, in the
Bible's words.

Each prompt asks for a number of words ('Say something in 5 words, using words from the Bible.'). The
reward checks both constraints, with partial credit so that every sample carries signal: half of it is the
share of the completion's words that the King James Bible uses (any case), half is how close its length is
to the number asked (1 at the exact count, falling linearly to 0 at twice or none). A chat model finetuned
from a tiny Bible-trained base starts around half marks (its samples run long and mix in misspellings and
modern words) and learns both to stop and to keep to its base's vocabulary: `rl.prompts=kjv:words`,
`rl.reward=("jaxlm.data.words:bible_words",)`.
"""

from __future__ import annotations

import functools
import json
import random
import re

from jaxlm.data import corpus

SOURCE = "kjv:words"
_WORD = re.compile(r"[A-Za-z']+")


def rows(count: int = 400, seed: int = 0, min_words: int = 3, max_words: int = 8) -> list[dict]:
    """Prompt rows {"prompt", "words"}: each asks for min..max_words words."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(min_words, max_words)
        out.append({"prompt": f"Say something in {n} words, using words from the Bible.", "words": n})
    return out


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word of the King James Bible, lower-cased."""
    found = set()
    with open(corpus.bible_path(), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                found.update(w.lower() for w in _WORD.findall(json.loads(line)["text"]))
    return frozenset(found)


def bible_words(prompt: dict, completion: str) -> float:
    """0.5 x the share of the completion's words found in the KJV + 0.5 x (1 - |words - asked| / asked,
    at least 0); 0 for a completion without words."""
    said = [w.lower() for w in _WORD.findall(completion)]
    if not said:
        return 0.0
    known = sum(w in vocabulary() for w in said) / len(said)
    asked = prompt["words"]
    return 0.5 * known + 0.5 * max(0.0, 1.0 - abs(len(said) - asked) / asked)
