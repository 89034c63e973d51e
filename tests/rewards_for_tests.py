"""Reward functions for tests/test_reward_functions.py, imported by module path as a user's would be."""

import time


def length(prompt, completion):
    return float(len(completion.split()))


def says_amen(prompt, completion):
    return 1.0 if completion.strip().endswith("Amen.") else 0.0


def picky(prompt, completion):
    """Fails in every way a reward function can, chosen by the prompt."""
    kind = prompt["kind"]
    if kind == "raise":
        raise KeyError("answer")
    if kind == "string":
        return "1.0"
    if kind == "nan":
        return float("nan")
    if kind == "hang":
        time.sleep(60)
    return 1.0
