"""Writes a real multiple-choice task from the Bible chapters the tiny preset holds out of training:
each question is the first half of a sentence, the choices its true second half and three second halves
of other held-out sentences. Chance is 25%.

    python bench/verse_choice.py verse_choice.jsonl [--questions 200]
    jaxlm eval runs/tiny --task mc:verse_choice.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile

from jaxlm.core import overrides
from jaxlm.evaluation.runner import heldout_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the JSONL file to write")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # A chapter is its title line, then its verses run together: sentences stand in for verses.
    sentences = [s for chapter in heldout_texts(overrides.load(["tiny"]))
                 for s in re.split(r"(?<=[.?!])\s+", chapter.split("\n", 1)[-1])]
    verses = [v.split() for v in sentences]
    verses = [v for v in verses if len(v) >= 8]
    rng = random.Random(args.seed)
    rng.shuffle(verses)
    rows = []
    for i, words in enumerate(verses[:args.questions]):
        cut = len(words) // 2
        others = rng.sample(verses[:i] + verses[i + 1:], 3)
        choices = [" " + " ".join(words[cut:])] + [" " + " ".join(o[len(o) // 2:]) for o in others]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"context": " ".join(words[:cut]), "choices": [choices[j] for j in order],
                     "answer": order.index(0)})
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.out)), delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(f.name, args.out)
    print(f"wrote {len(rows)} questions from {len(verses)} held-out verses to {args.out}")


if __name__ == "__main__":
    main()
