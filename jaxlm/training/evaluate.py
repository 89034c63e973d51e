"""The one eval loop: an objective's sums over fixed held-out batches, plus optional task evaluations."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxlm.training.objectives import TOTALS, Objective
from jaxlm.training.step import make_eval_step


class Evaluator:
    """params -> {"eval/loss", "eval/perplexity" (per-token objectives), "eval/<metric>", task results}.

    The batches are global arrays, built once, so every evaluation reads the same rows; the eval step is
    jitted once. Sums add over batches and are divided by the total weight, so the result does not depend
    on how the held-out rows are batched."""

    def __init__(self, objective: Objective, batches: list, tasks: Callable | None = None):
        self.objective, self.batches, self.tasks = objective, batches, tasks
        self.eval_step = jax.jit(make_eval_step(objective))

    def __bool__(self) -> bool:
        return bool(self.batches) or self.tasks is not None

    def __call__(self, params) -> dict[str, float]:
        out = {}
        if self.batches:
            sums: dict[str, float] = {}
            for batch in self.batches:
                for k, v in jax.device_get(self.eval_step(params, batch)).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            weight = max(sums.pop("weight"), 1.0)
            out.update({f"eval/{k}": v / weight for k, v in sums.items() if k not in TOTALS})
            if self.objective.per_token:
                out["eval/perplexity"] = float(np.exp(min(out["eval/loss"], 50.0)))
        if self.tasks is not None:
            out.update({f"eval/{task}/{key}": float(value) for task, result in self.tasks(params).items()
                        for key, value in result.items() if isinstance(value, (int, float)) and key != "seconds"})
        return out
