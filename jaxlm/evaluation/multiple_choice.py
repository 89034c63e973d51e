"""Log-likelihood multiple choice: the choice whose continuation the model finds most likely wins.

A task is JSONL with one question per line: {"context": str, "choices": [str, ...], "answer": int}.
`acc` compares summed log-likelihoods; `acc_norm` divides each by the choice's length in bytes, which
removes the bias towards short answers (as lm-evaluation-harness does).
"""

from __future__ import annotations

import json

from jaxlm.core.config import ConfigError
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.inference.scoring import Scorer, encode_pair


def load_task(path: str) -> list[dict]:
    questions = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    q = json.loads(line)
                    ok = (isinstance(q.get("context"), str) and isinstance(q.get("choices"), list)
                          and len(q["choices"]) >= 2 and all(isinstance(c, str) and c for c in q["choices"])
                          and isinstance(q.get("answer"), int) and 0 <= q["answer"] < len(q["choices"]))
                except (json.JSONDecodeError, AttributeError):
                    ok = False
                if not ok:
                    raise ConfigError(f"{path}:{n}: expected {{\"context\": str, \"choices\": [>=2 non-empty str], "
                                      f"\"answer\": index}}")
                questions.append(q)
    except OSError as e:
        raise ConfigError(f"cannot read multiple-choice task: {e}") from None
    if not questions:
        raise ConfigError(f"{path} holds no questions")
    return questions


def evaluate(scorer: Scorer, tokenizer: Tokenizer, questions: list[dict]) -> dict[str, float]:
    requests = [encode_pair(tokenizer, q["context"], choice) for q in questions for choice in q["choices"]]
    scores = scorer.loglikelihood(requests)
    correct = correct_norm = 0
    offset = 0
    for q in questions:
        k = len(q["choices"])
        lls = [s.logprob for s in scores[offset:offset + k]]
        normed = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, q["choices"])]
        correct += max(range(k), key=lls.__getitem__) == q["answer"]
        correct_norm += max(range(k), key=normed.__getitem__) == q["answer"]
        offset += k
    n = len(questions)
    return {"questions": n, "acc": correct / n, "acc_norm": correct_norm / n}

