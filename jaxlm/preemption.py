"""Turns SIGTERM (preemption) and Ctrl-C into a request to checkpoint at the next step boundary."""

from __future__ import annotations

import logging
import signal

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
