"""Turns SIGTERM (preemption) and Ctrl-C into a checkpoint at the next step boundary, agreed by all hosts."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time

import jax

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the end of this step, then exiting", self.signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None


STOP, TIME_CHECKPOINT = 1, 2  # flag bits agreed across hosts


@dataclasses.dataclass(frozen=True)
class Decision:
    stop: str | None  # why the run stops after this step, or None
    temporary_checkpoint: bool  # the time-based checkpoint is due


class StepBoundary:
    """Decides after each step, identically on every host, whether to stop and whether to save a
    time-based checkpoint.

    A stop request seen by any host, and process 0's clock for time-based checkpoints, are combined by
    a cross-host agreement every `sync_every` steps, so all hosts save the same step and stop together.
    """

    def __init__(self, stop: StopRequest, every_minutes: float, sync_every: int, agreement):
        self.stop, self.sync_every, self.agree = stop, sync_every, agreement
        self.every_s = every_minutes * 60.0
        self.last_save = time.monotonic()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def check(self, step: int) -> Decision:
        multi = jax.process_count() > 1
        if multi and step % self.sync_every:
            return Decision(None, False)
        flags = STOP if self.stop.requested else 0
        if self.every_s and jax.process_index() == 0 and time.monotonic() - self.last_save >= self.every_s:
            flags |= TIME_CHECKPOINT
        combined, who = self.agree(step, flags) if multi else (flags, [])
        reason = None
        if combined & STOP:
            if self.stop.requested:
                reason = self.stop.signal
            else:
                reason = f"a stop request on process {', '.join(map(str, who))}"
                self.stop.signal = reason
        return Decision(reason, bool(combined & TIME_CHECKPOINT))
