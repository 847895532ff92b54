"""Server metrics in the Prometheus text format (version 0.0.4), without a client library."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Histogram:
    def __init__(self, buckets) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, count in zip([*map(_number, self.buckets), "+Inf"], self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {total}"]


class Metrics:
    """Counters and histograms fed by the request handlers and the engine thread; gauges and
    the counters kept elsewhere (the KV cache's) are read from callbacks when scraped."""

    def __init__(self, max_batch: int) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = self.completion_tokens = self.cancelled = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.first_token = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(sorted({2 ** i for i in range(max_batch.bit_length()) if 2 ** i < max_batch} | {max_batch}))
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}

    def request(self, endpoint: str, code: int) -> None:
        with self._lock:
            self.requests[(endpoint, code)] += 1

    def finished(self, prompt_tokens: int, completion_tokens: int, latency_s: float, first_token_s: float | None):
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.latency.observe(latency_s)
            if first_token_s is not None:
                self.first_token.observe(first_token_s)

    def decode_step(self, sequences: int) -> None:
        with self._lock:
            self.batch.observe(sequences)

    def disconnected(self) -> None:
        with self._lock:
            self.cancelled += 1

    def render(self) -> str:
        p = "meganeura_"
        with self._lock:
            out = [f"# HELP {p}requests_total HTTP requests to /v1 by endpoint and status code.",
                   f"# TYPE {p}requests_total counter"]
            out += [f'{p}requests_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self.requests.items())]
            for name, value, help_ in (
                    ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished completions."),
                    ("completion_tokens_total", self.completion_tokens, "Tokens generated for finished completions."),
                    ("client_disconnects_total", self.cancelled, "Requests whose client left before the answer ended.")):
                out += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} counter", f"{p}{name} {value}"]
            for name, hist, help_ in (
                    ("request_duration_seconds", self.latency, "Chat completion latency, request to last token."),
                    ("time_to_first_token_seconds", self.first_token, "Chat completion latency to the first token."),
                    ("decode_batch_size", self.batch, "Sequences in each decode step.")):
                out += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram", *hist.lines(p + name)]
        for kind, read_all in (("gauge", self.gauges), ("counter", self.counters)):
            for name, (help_, read) in read_all.items():
                out += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} {kind}", f"{p}{name} {_number(read())}"]
        return "\n".join(out) + "\n"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
