"""A heartbeat thread that reports a training phase (step, eval, checkpoint) that has stopped progressing.

A stuck collective (a dead or hung peer host) blocks the training thread inside XLA forever, without
an error. The loop calls `beat(step, phase)` as work completes; when no beat comes for `timeout_s`, this
thread logs which step, which phase, on which host and process, with every thread's Python stack, and
repeats the report every `timeout_s` until progress resumes.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
import traceback

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, timeout_s: float, process_index: int = 0, process_count: int = 1,
                 on_hang=None, poll_s: float | None = None):
        self.timeout_s = timeout_s
        self.where = f"host {socket.gethostname()} (process {process_index} of {process_count})"
        self.on_hang = on_hang  # called with the report line, after logging (tests, alerting)
        self.poll_s = poll_s or max(min(timeout_s / 4, 10.0), 0.01)
        self._lock = threading.Lock()
        self._step, self._phase, self._since = 0, "start", time.monotonic()
        self._reported_at = None
        self.reports: list[str] = []
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "Watchdog":
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="jaxlm-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int, phase: str = "step") -> None:
        """Progress: `phase` of `step` starts now (the previous phase finished)."""
        with self._lock:
            if self._reported_at is not None:
                log.warning("watchdog: %s progressed again after %.0fs: now %s %d", self.where,
                            time.monotonic() - self._since, phase, step)
            self._step, self._phase, self._since, self._reported_at = step, phase, time.monotonic(), None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                now = time.monotonic()
                waited = now - self._since
                due = waited >= self.timeout_s and (
                    self._reported_at is None or now - self._reported_at >= self.timeout_s)
                if not due:
                    continue
                self._reported_at = now
                line = (f"watchdog: {self._phase} {self._step} has not finished after {waited:.0f}s on "
                        f"{self.where}; a collective may be stuck (is another host down or slower?)")
            self.reports.append(line)
            log.error("%s\n%s", line, _stacks())
            if self.on_hang is not None:
                self.on_hang(line)


def _stacks() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame))
                     for ident, frame in sys._current_frames().items())
