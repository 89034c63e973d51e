"""Continuous batching: requests wait in a queue, take a free slot, are prefilled a chunk at a time between
decode steps, and leave their slot the moment they finish or are cancelled.

One thread drives the engine; requests come from the HTTP threads through `submit` and `cancel`, and every
token goes back through the request's own `emit` callback (which hands it to the request's event loop).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import threading
import time
from typing import Callable

import numpy as np

from jaxlm.serving.engine import Sampled, Sampling, SlotEngine
from jaxlm.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the queue holds (HTTP 429)."""


class Closed(Exception):
    """The scheduler has stopped taking requests (shutting down)."""


@dataclasses.dataclass
class Token:
    id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclasses.dataclass
class Finished:
    reason: str  # "stop" (end of sequence), "length" (max_tokens or the context), "cancelled", "error"
    message: str = ""


@dataclasses.dataclass(eq=False)
class Sequence:
    """One completion being generated: a request with n choices is n sequences."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    emit: Callable[[Token | Finished], None]
    top_logprobs: int = 0  # alternatives to report per token
    ignore_eos: bool = False
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    generated: int = 0
    last: int = 0  # the newest token, written to the cache by the next decode step
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    last_emit: float = 0.0


class Scheduler:
    def __init__(self, engine: SlotEngine, eos_id: int, max_queue: int, metrics: ServerMetrics):
        self.engine, self.eos_id, self.max_queue, self.metrics = engine, eos_id, max_queue, metrics
        self._lock = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefilling: list[Sequence] = []  # holding a slot, prompt partly in the cache
        self._running: dict[int, Sequence] = {}  # slot -> sequence, decoding
        self._free = list(range(engine.slots))  # a heap: the lowest free slot first
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="jaxlm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancels whatever is left and joins the engine thread."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queues all of a request's sequences, or none of them."""
        with self._lock:
            if self._closed:
                raise Closed("the server is shutting down")
            busy = len(self._prefilling) + len(self._running)
            if len(self._waiting) + len(sequences) > self.max_queue + max(0, self.engine.slots - busy):
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the queue holds "
                                f"{self.max_queue}); retry later")
            self._waiting.extend(sequences)
            self._lock.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Marks sequences cancelled; the engine thread frees their slots before its next step."""
        with self._lock:
            for s in sequences:
                s.cancelled = True
            self._lock.notify()

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests' sequences."""
        with self._lock:
            return len(self._waiting), len(self._prefilling) + len(self._running)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._drop_cancelled()
                while not (self._closed or self._waiting or self._prefilling or self._running):
                    self._lock.wait()
                if self._closed:
                    break
            try:
                self._prefill_some()
                if self._running:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests, not the server
                log.exception("engine step failed")
                self.engine.reset()  # the step may have consumed (donated) the cache
                self._fail_all(f"{type(e).__name__}: {e}")
            self.metrics.observe_counts(*self.counts())
        self._fail_all("the server is shutting down", reason="cancelled")

    def _drop_cancelled(self) -> None:
        """Called with the lock held."""
        self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        for s in [s for s in self._prefilling if s.cancelled]:
            self._prefilling.remove(s)
            self._release(s)
        for s in [s for s in self._running.values() if s.cancelled]:
            self._finish(s, Finished("cancelled"))

    def _prefill_some(self) -> None:
        """Prefills about one chunk's worth of prompt tokens (so decoding requests wait about one chunk),
        taking waiting requests into free slots as it goes. A prompt is cut at multiples of the chunk size,
        so a padded chunk always fits in the cache."""
        budget = chunk_size = self.engine.buckets[-1]
        while budget > 0:
            with self._lock:
                if not self._prefilling and self._waiting and self._free:
                    seq = self._waiting.popleft()
                    seq.slot = heapq.heappop(self._free)
                    self._prefilling.append(seq)
                if not self._prefilling:
                    return
                seq = self._prefilling[0]
            chunk = seq.prompt[seq.prefilled:seq.prefilled + chunk_size]
            out = self.engine.prefill(seq.slot, seq.prefilled, chunk, seq.sampling)
            seq.prefilled += len(chunk)
            budget -= next(b for b in self.engine.buckets if b >= len(chunk))
            if seq.prefilled == len(seq.prompt):
                with self._lock:
                    self._prefilling.remove(seq)
                    self._running[seq.slot] = seq
                self.metrics.first_token(time.perf_counter() - seq.submitted, len(seq.prompt))
                self._deliver(seq, out, 0)

    def _decode(self) -> None:
        slots = self.engine.slots
        tokens, lengths = np.zeros(slots, np.int32), np.full(slots, -1, np.int32)
        counters, sampling = np.zeros(slots, np.int32), [Sampling()] * slots
        running = dict(self._running)
        for slot, seq in running.items():
            tokens[slot], lengths[slot] = seq.last, len(seq.prompt) + seq.generated - 1
            counters[slot], sampling[slot] = seq.generated, seq.sampling
        out = self.engine.decode(tokens, lengths, sampling, counters)
        for slot, seq in running.items():
            if not seq.cancelled:
                self._deliver(seq, out, slot)

    def _deliver(self, seq: Sequence, out: Sampled, row: int) -> None:
        token = int(out.token[row])
        k = seq.top_logprobs
        seq.emit(Token(token, float(out.logprob[row]), out.top_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist()))
        now = time.perf_counter()
        if seq.generated:
            self.metrics.inter_token(now - seq.last_emit)
        seq.generated, seq.last, seq.last_emit = seq.generated + 1, token, now
        self.metrics.generated(1)
        if token == self.eos_id and not seq.ignore_eos:
            self._finish(seq, Finished("stop"))
        elif seq.generated >= seq.max_tokens or len(seq.prompt) + seq.generated >= self.engine.max_len:
            self._finish(seq, Finished("length"))

    def _finish(self, seq: Sequence, done: Finished) -> None:
        with self._lock:
            self._running.pop(seq.slot, None)
            self._release(seq)
        seq.emit(done)

    def _release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            heapq.heappush(self._free, seq.slot)
            seq.slot = -1

    def _fail_all(self, message: str, reason: str = "error") -> None:
        with self._lock:
            pending = [*self._waiting, *self._prefilling, *self._running.values()]
            self._waiting.clear()
            self._prefilling.clear()
            self._running.clear()
            self._free = list(range(self.engine.slots))
        for seq in pending:
            seq.slot = -1
            seq.emit(Finished(reason, message))
