"""The server's Prometheus metrics, in a registry of its own (no process-wide singletons)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many recent seconds


class ServerMetrics:
    """Queue length, running requests, tokens/s and latencies, exposed as text at /metrics."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.waiting = Gauge("jaxlm_requests_waiting", "sequences waiting for a decode slot", registry=r)
        self.running = Gauge("jaxlm_requests_running", "sequences holding a decode slot", registry=r)
        self.tokens = Counter("jaxlm_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("jaxlm_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.tokens_per_s = Gauge("jaxlm_generated_tokens_per_second",
                                  f"tokens generated per second over the last {RATE_WINDOW_S:g} s", registry=r)
        self.ttft = Histogram("jaxlm_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jaxlm_inter_token_latency_seconds", "between a sequence's consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.compiled = Gauge("jaxlm_compiled_programs", "engine programs compiled (fixed after start)", registry=r)
        self.requests = Counter("jaxlm_requests", "HTTP requests answered, by status", ["status"], registry=r)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.tokens_per_s.set_function(self._rate)

    def observe_counts(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def generated(self, n: int) -> None:
        self.tokens.inc(n)
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def text(self) -> bytes:
        return generate_latest(self.registry)
