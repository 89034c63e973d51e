"""A built-in verifiable task for learning from rewards: continue a King James verse.

Each prompt is the first part of a verse ("Continue the verse: In the beginning God created"); the reward is
the unigram F1 of the completion's first words against the verse's next words ("the heaven and the earth"),
lower-cased and without punctuation, so partial answers earn partial credit and words off the verse cost
precision. A tiny model pretrained on the Bible does better than chance here but improves slowly (about
0.10 to 0.12 in 80 GRPO steps), so the presets use `kjv:words` (jaxlm/data/words.py) instead; this one is
`rl.prompts=kjv:verses`, `rl.reward=("jaxlm.data.verses:continuation_f1",)`.
"""

from __future__ import annotations

import collections
import json
import random
import re

from jaxlm.data import corpus

SOURCE = "kjv:verses"
INSTRUCTION = "Continue the verse: "
_WORD = re.compile(r"[a-z']+")


def rows(count: int = 2000, seed: int = 0, min_words: int = 8, max_words: int = 24) -> list[dict]:
    """Prompt rows: a verse's first half as the prompt, its rest as "answer"; verses of min..max words."""
    verses = []
    with open(corpus.bible_path(), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                text = json.loads(line)["text"].strip()
                if min_words <= len(text.split()) <= max_words:
                    verses.append(text)
    rng = random.Random(seed)
    out = []
    for text in rng.sample(verses, min(count, len(verses))):
        words = text.split()
        cut = len(words) // 2
        out.append({"prompt": INSTRUCTION + " ".join(words[:cut]), "answer": " ".join(words[cut:])})
    return out


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


ANSWER_WORDS = 6  # the verse's next words that are scored: the closest, most predictable part


def continuation_f1(prompt: dict, completion: str) -> float:
    """Unigram F1 of the completion's first ANSWER_WORDS + 2 words against the verse's next ANSWER_WORDS."""
    answer = _words(prompt["answer"])[:ANSWER_WORDS]
    said = _words(completion)[: len(answer) + 2]
    common = sum((collections.Counter(answer) & collections.Counter(said)).values())
    if not common:
        return 0.0
    precision, recall = common / len(said), common / len(answer)
    return 2 * precision * recall / (precision + recall)
