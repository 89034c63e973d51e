"""The one training loop: runs steps and fires the hooks its caller registers.

The loop knows nothing of objectives: a step's metrics are whatever the objective returns (at least
"loss", "grad_norm", "tokens" and "finite"). Metrics are read one step late, so the host never waits on the
device. Hooks (`jaxlm.training.hooks`) log, evaluate, checkpoint, agree on preemption and profile; the
watchdog, when given, is told of every phase so that a hang names the step and phase it stopped in.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Protocol

import jax

from jaxlm.core.sharding import global_batch

log = logging.getLogger("jaxlm.train")


class NonFiniteError(RuntimeError):
    pass


class Hook(Protocol):
    def before_step(self, loop: "Loop", step: int) -> None: ...

    def after_step(self, loop: "Loop", step: int, state) -> None: ...

    def close(self, loop: "Loop") -> None: ...


@dataclasses.dataclass
class LoopResult:
    step: int  # the last step taken
    stopped_by: str | None  # why the loop stopped early (a signal, train.stop_at), None if it ran to the end
    skipped: int  # non-finite steps whose update was skipped
    last: dict[str, float]  # the latest value of every metric read (train and eval)


class Window:
    """Sums of the step metrics read since the last log line."""

    def __init__(self):
        self.n, self.tokens, self.sums, self.t0 = 0, 0.0, {}, time.perf_counter()

    def add(self, metrics: dict) -> None:
        self.n += 1
        self.tokens += float(metrics["tokens"])
        for k, v in metrics.items():
            if k not in ("finite", "tokens", "grad_norm", "lr"):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.sums.items()}


class Loop:
    def __init__(self, total: int, mesh, on_nonfinite: str = "stop", watchdog=None):
        self.total, self.mesh, self.on_nonfinite, self.watchdog = total, mesh, on_nonfinite, watchdog
        self.hooks: list = []
        self.pending = None  # (step, device metrics) not yet read
        self.window = Window()
        self.last: dict[str, float] = {}
        self.skipped = 0
        self.read_step = 0
        self.stopped_by: str | None = None
        self.batches = None
        self.failed = False  # an exception is unwinding the loop: hooks close without reading more

    def add_hook(self, hook) -> "Loop":
        self.hooks.append(hook)
        return self

    def beat(self, step: int, phase: str | None = None) -> None:
        """Tells the watchdog that `step` (or its `phase`) is what the loop now waits on."""
        if self.watchdog is not None:
            self.watchdog.beat(step, phase) if phase else self.watchdog.beat(step)

    def stop(self, reason: str) -> None:
        """Ends the run after the current step's hooks (a checkpoint hook saves first)."""
        self.stopped_by = self.stopped_by or reason

    def run(self, step_fn: Callable, state, first_batch, batches, start: int):
        """Steps from `start` to `total` (or a stop); returns (final state, LoopResult)."""
        self.batches = batches
        if self.watchdog is not None:
            self.watchdog.start()
        self.beat(start + 1)  # the watchdog names the oldest step not yet finished
        step, batch = start, first_batch
        try:
            while step < self.total:
                for hook in self.hooks:
                    hook.before_step(self, step)
                state, metrics = step_fn(state, batch)
                self.sync()  # the previous step's metrics; this step is already queued
                step += 1
                self.pending = (step, metrics)
                for hook in self.hooks:
                    hook.after_step(self, step, state)
                if self.stopped_by is not None:
                    break
                if step < self.total:
                    batch = global_batch(next(batches), self.mesh)
            self.sync()
        except BaseException:
            self.failed = True
            raise
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            for hook in self.hooks:  # in order: the last log line comes before waiting on a checkpoint
                hook.close(self)
        return state, LoopResult(step, self.stopped_by, self.skipped, dict(self.last))

    def sync(self) -> None:
        """Reads the pending step's metrics (waiting for that step): before anything that must not run
        past a step not yet checked, such as a checkpoint or an eval."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        self.read_step = step
        m = jax.device_get(metrics)
        self.beat(step + 1)
        if not bool(m["finite"]):
            if self.on_nonfinite == "stop":
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}); the update was not applied and not checkpointed. "
                    f"Lower optim.lr, or set train.on_nonfinite=skip"
                )
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradient, update skipped", step)
            return
        self.window.add(m)
        self.last.update({k: float(v) for k, v in m.items() if k not in ("finite", "tokens")})
