"""The hooks a run registers on `training.loop.Loop`: logging, evaluation, checkpoints with preemption,
and profiling. Each fires after a step (`after_step`), some also before one, and each closes at exit."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import jax

from jaxlm.core.overrides import to_dict
from jaxlm.training.preemption import StepBoundary, StopRequest

log = logging.getLogger("jaxlm.train")


class Hook:
    def before_step(self, loop, step: int) -> None:
        pass

    def after_step(self, loop, step: int, state) -> None:
        pass

    def close(self, loop) -> None:
        pass


class LogMetrics(Hook):
    """Every `every` steps (and at the end): window means to the metrics writer and the progress bar, with
    tokens/s and MFU. Logs the steps read so far (one behind), so that logging never waits on the device."""

    def __init__(self, writer, every: int, start: int, total: int, flops_per_token: float, peak_total: float,
                 progress: bool):
        from tqdm import tqdm

        self.writer, self.every, self.flops_per_token, self.peak_total = writer, every, flops_per_token, peak_total
        self.bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True,
                        smoothing=0)

    def after_step(self, loop, step: int, state) -> None:
        if step % self.every == 0:
            self.log(loop, step)

    def log(self, loop, dispatched: int) -> None:
        w, step = loop.window, loop.read_step
        self.bar.update(dispatched - self.bar.n)
        if not w.n:
            return
        tokens_per_s = w.tokens / (time.perf_counter() - w.t0)
        mfu = tokens_per_s * self.flops_per_token / self.peak_total
        means = w.means()
        # grad_norm and lr as at the last step read; everything else averaged over the window.
        scalars = {f"train/{k}": v for k, v in means.items()} | {
            "train/grad_norm": loop.last["grad_norm"], "train/lr": loop.last.get("lr", 0.0),
            "perf/tokens_per_s": tokens_per_s, "perf/mfu": mfu, "train/skipped_steps": loop.skipped}
        self.writer.write(step, scalars)
        shown = " | ".join(f"{k} {v:.3g}" if k != "loss" else f"loss {v:.3f}" for k, v in means.items())
        self.bar.set_postfix_str(f"{shown} | {tokens_per_s:,.0f} tok/s | MFU {mfu:.1%}")
        loop.window = type(w)()

    def close(self, loop) -> None:
        if not loop.failed:
            self.log(loop, max(loop.read_step, self.bar.n))
        self.bar.close()
        self.writer.close()


class Evaluate(Hook):
    """Every `every` steps and at the last step (`every=0`: only at the last): `evaluate(params)` to the
    writer and the run's latest metrics. Evaluation time is kept out of the throughput window."""

    def __init__(self, evaluate: Callable, writer, every: int, total: int):
        self.evaluate, self.writer, self.every, self.total = evaluate, writer, every, total

    def after_step(self, loop, step: int, state) -> None:
        if (self.every and step % self.every == 0) or step == self.total:
            loop.sync()  # finish the training step first, so its time counts as training
            loop.beat(step, "eval after step")
            began = time.perf_counter()
            scalars = self.evaluate(state.params)
            self.writer.write(step, scalars)
            loop.last.update(scalars)
            log.info("step %d: %s", step, ", ".join(f"{k[5:]} {v:.4g}" for k, v in scalars.items()))
            loop.window.t0 += time.perf_counter() - began


class Checkpoint(Hook):
    """Saves every `every` steps, at the last step, on a stop (SIGTERM/SIGINT on any host, or
    `train.stop_at`), and a temporary checkpoint every `every_minutes`; all hosts agree on each decision.
    `checkpointed(state)` is the part of the state a checkpoint holds (LoRA leaves out the frozen base)."""

    def __init__(self, ckpt, config, boundary: StepBoundary, stop: StopRequest, total: int,
                 checkpointed: Callable = lambda state: state):
        self.ckpt, self.config, self.boundary, self.stop_request = ckpt, config, boundary, stop
        self.every, self.stop_at, self.total = config.checkpoint.every, config.train.stop_at, total
        self.checkpointed = checkpointed
        self.saved_config = to_dict(config)  # the frozen config, as every checkpoint records it
        stop.install()

    def after_step(self, loop, step: int, state) -> None:
        loop.beat(step, "cross-host agreement after step")
        decision = self.boundary.check(step)  # the same answer on every host
        loop.beat(step if loop.pending else step + 1)
        if step == self.stop_at and not self.stop_request.requested:
            self.stop_request.signal = f"train.stop_at={self.stop_at}"
        stopping = decision.stop is not None or step == self.stop_at
        permanent = step % self.every == 0 or step == self.total or stopping
        if permanent or decision.temporary_checkpoint:
            loop.sync()  # never checkpoint past a step we have not checked
            loop.beat(step, "checkpoint save")
            self.ckpt.save(step, self.checkpointed(state), loop.batches.get_state(), self.saved_config,
                           force=True, temporary=not permanent)
            self.boundary.saved()
            loop.beat(step + 1)
            if not permanent:
                log.info("step %d: time-based temporary checkpoint saved", step)
        if stopping:
            log.info("stopped by %s after step %d; checkpoint saved", self.stop_request.signal, step)
            loop.stop(self.stop_request.signal)

    def close(self, loop) -> None:
        self.stop_request.uninstall()
        self.ckpt.close()


class Profile(Hook):
    """A jax.profiler trace of steps [start, start + steps) into <run>/profile."""

    def __init__(self, run_dir: str, start: int, steps: int):
        self.directory, self.start, self.end = os.path.join(run_dir, "profile"), start, start + steps
        self.active = False

    def before_step(self, loop, step: int) -> None:
        if step == self.start:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, loop, step: int, state) -> None:
        if self.active and step >= self.end:
            jax.block_until_ready(state)
            self.close(loop)

    def close(self, loop) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
