"""Python reward functions for learning from verifiable rewards, named by module path and run in a guarded
worker process.

`load("my_rewards:exact_match")` imports `my_rewards` and takes its `exact_match`: nothing is ever `eval`'d.
A function is called as fn(prompt=<the prompt row>, completion=<text>) and must return a finite number.
`Scorer` scores a rollout's groups (one prompt's G completions) with the sum of its functions in a process
of its own, so that a function that hangs can be stopped. A group where any call raises, returns a
non-number or NaN/inf, or outlasts `timeout` seconds is dropped and counted by reason; training goes on
until more than `max_failed_fraction` of all groups scored so far have failed, then `RewardError` stops it.
With several processes (multi-host training), process 0 runs the functions and every process takes its
results, so that the hosts train on the same rewards and stop together.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import math
import multiprocessing
import numbers

import numpy as np

from jaxlm.core.config import ConfigError


class RewardError(RuntimeError):
    """Too many groups failed to score; the message says how many and why."""


def load(spec: str):
    """The function `spec` ("package.module:function") names, imported."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"reward function {spec!r} is not MODULE:FUNCTION (e.g. my_rewards:exact_match)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward function {spec!r}: cannot import {module_name} ({e}); put it on PYTHONPATH") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {module_name} has no function {name}")
    return fn


def _score_group(specs: tuple[str, ...], prompt, completions: list[str]) -> tuple[list[float] | None, str]:
    """In the worker: the summed rewards of one group's completions, or (None, why it failed)."""
    rewards = []
    for completion in completions:
        total = 0.0
        for spec in specs:
            try:
                value = load(spec)(prompt=prompt, completion=completion)
            except Exception as e:  # noqa: BLE001 - a user's function failing drops its group, not the run
                return None, f"raised {type(e).__name__}"
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                return None, "not a number"
            if not math.isfinite(float(value)):
                return None, "not finite"
            total += float(value)
        rewards.append(total)
    return rewards, ""


def _process_index() -> int:
    import jax  # not at the top: the worker imports this module and needs no JAX

    return jax.process_index()


def _from_process_0(rewards: np.ndarray, ok: np.ndarray, failed: collections.Counter):
    """Process 0's (rewards, ok, failed) on every process. Rewards must agree on every host, and a timeout, or
    a function that is not deterministic, would tell hosts apart. Sent as JSON (exact for float32 values)."""
    import jax

    if jax.process_count() == 1:
        return rewards, ok, failed
    from jax.experimental import multihost_utils

    mine = json.dumps({"rewards": rewards.tolist(), "ok": ok.tolist(), "failed": dict(failed)}).encode()
    data = np.frombuffer(mine, np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buffer = np.zeros(size, np.uint8)
    buffer[:data.size] = data
    got = json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())
    return (np.asarray(got["rewards"], np.float32), np.asarray(got["ok"], bool),
            collections.Counter(got["failed"]))


@dataclasses.dataclass
class Scored:
    rewards: np.ndarray  # (P, G) float32; rows of dropped groups are 0
    ok: np.ndarray  # (P,) bool: the group scored
    failures: collections.Counter  # why groups were dropped, this call


class Scorer:
    def __init__(self, specs: tuple[str, ...], timeout: float, max_failed_fraction: float):
        for spec in specs:  # named in one line now, not in a worker later
            load(spec)
        self.specs, self.timeout, self.max_failed = tuple(specs), timeout, max_failed_fraction
        self.groups = 0
        self.failures: collections.Counter = collections.Counter()
        self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def _worker(self):
        if self._pool is None:  # spawn: the parent holds JAX threads that fork would copy
            self._pool = multiprocessing.get_context("spawn").Pool(1)
        return self._pool

    def score(self, prompts: list, completions: list[list[str]]) -> Scored:
        """Rewards of each prompt's group of completions; raises RewardError past the failure budget."""
        g = max((len(c) for c in completions), default=0)
        rewards, ok = np.zeros((len(prompts), g), np.float32), np.zeros(len(prompts), bool)
        failed: collections.Counter = collections.Counter()
        if not self.specs:  # no functions (a reward model alone scores): nothing to run or to fail
            return Scored(rewards, ~ok, failed)
        if _process_index() == 0:  # with several processes, process 0 scores and every process takes its results
            for i, (prompt, group) in enumerate(zip(prompts, completions)):
                job = self._worker().apply_async(_score_group, (self.specs, prompt, group))
                try:
                    values, why = job.get(timeout=self.timeout)
                except multiprocessing.TimeoutError:
                    self.close()  # the only way to stop a call that hangs
                    values, why = None, "timed out"
                if values is None:
                    failed[why] += 1
                else:
                    rewards[i, :len(values)], ok[i] = values, True
        rewards, ok, failed = _from_process_0(rewards, ok, failed)
        self.groups += len(prompts)
        self.failures.update(failed)
        lost = sum(self.failures.values())
        if self.groups and lost / self.groups > self.max_failed:
            reasons = ", ".join(f"{why} {n}" for why, n in self.failures.most_common())
            raise RewardError(f"{lost} of {self.groups} prompt groups failed to score ({reasons}), over "
                              f"the limit of {self.max_failed:.0%}; fix the reward functions {', '.join(self.specs)}")
        return Scored(rewards, ok, failed)
