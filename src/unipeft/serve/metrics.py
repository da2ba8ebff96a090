"""Server metrics in Prometheus' text exposition format (version 0.0.4), written without a client library."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative-bucket histogram of observed values."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        """Add `value` (`times` times)."""
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += times
        self.total += value * times
        self.count += times

    def lines(self, name: str, labels: str = "") -> list[str]:
        """The _bucket, _sum and _count sample lines."""
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        tail = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{tail} {_num(self.total)}", f"{name}_count{tail} {self.count}"]


def _num(value: float) -> str:
    """A sample value as Prometheus prints it (integers without a decimal point)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _esc(value: str) -> str:
    """A label value escaped for the text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters and histograms the app updates per request; engine gauges are read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.prompt_tokens = self.generated_tokens = 0
        self.by_model: dict[str, list[int]] = {}  # model field (adapter or base) -> [generations, tokens]
        self.in_flight = 0

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def tokens(self, prompt: int, generated: int, model: str | None = None) -> None:
        """Count the prompt and generated tokens of one finished generation (and, per `model`, the request)."""
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated
            if model is not None:
                row = self.by_model.setdefault(model, [0, 0])
                row[0] += 1
                row[1] += generated

    def render(self, engine_stats: dict[str, Any] | None = None, adapters: dict[str, int] | None = None) -> str:
        """The whole exposition text."""
        with self._lock:
            samples = [f'{{endpoint="{_esc(e)}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines = _family("unipeft_requests_total", "counter", "HTTP requests by endpoint and status code", samples)
            lines += ["# HELP unipeft_request_latency_seconds Time from request to the last byte of the response",
                      "# TYPE unipeft_request_latency_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                lines += hist.lines("unipeft_request_latency_seconds", f'endpoint="{_esc(endpoint)}"')
            lines += _family("unipeft_prompt_tokens_total", "counter", "Prompt tokens of generation requests",
                             [f" {self.prompt_tokens}"])
            lines += _family("unipeft_generated_tokens_total", "counter", "Tokens generated for clients",
                             [f" {self.generated_tokens}"])
            per = sorted(self.by_model.items())
            lines += _family("unipeft_model_requests_total", "counter", "Finished generations per model (adapter or base)",
                             [f'{{model="{_esc(m)}"}} {n}' for m, (n, _t) in per])
            lines += _family("unipeft_model_generated_tokens_total", "counter", "Tokens generated per model",
                             [f'{{model="{_esc(m)}"}} {t}' for m, (_n, t) in per])
            lines += _family("unipeft_requests_in_flight", "gauge", "HTTP requests being handled",
                             [f" {self.in_flight}"])
        lines += _engine_lines(engine_stats or {})
        for name, value in sorted((adapters or {}).items()):
            lines += _family(f"unipeft_adapters_{name}", "gauge" if name in ("registered", "resident") else "counter",
                             f"Adapters: {name}", [f" {value}"])
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    """HELP and TYPE lines followed by the samples (each is the text after the metric name)."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *(f"{name}{s}" for s in samples)]


def _engine_lines(stats: dict[str, Any]) -> list[str]:
    """Gauges and counters from Engine.stats(); the batch size histogram from its {size: steps} counts."""
    lines: list[str] = []
    for key, name, kind, help_text in (
            ("waiting", "unipeft_queue_length", "gauge", "Requests waiting for a batch slot"),
            ("running", "unipeft_running_batch_size", "gauge", "Requests in the running batch"),
            ("steps", "unipeft_engine_steps_total", "counter", "Decoding steps of the engine"),
            ("tokens", "unipeft_engine_tokens_total", "counter", "Tokens the engine generated"),
            ("cancelled", "unipeft_engine_cancelled_total", "counter",
             "Requests ended early (a stop string matched on the text, or the client went away)")):
        if isinstance(stats.get(key), (int, float)):
            lines += _family(name, kind, help_text, [f" {_num(stats[key])}"])
    hist = stats.get("batch_sizes") or stats.get("batch_size_histogram")
    if isinstance(hist, dict) and hist:
        sizes = sorted(int(k) for k in hist)
        bounds = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < sizes[-1]] + [sizes[-1]]
        h = Histogram(bounds)
        for size, steps in hist.items():
            h.observe(float(size), int(steps))
        lines += ["# HELP unipeft_batch_size Rows per decoding step", "# TYPE unipeft_batch_size histogram"]
        lines += h.lines("unipeft_batch_size")
    return lines


ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/classify", "/v1/adapters", "/health",
             "/metrics", "/")


def _endpoint(path: str) -> str:
    """The metrics label of a request path (bounded: unknown paths share one label)."""
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/static/"):
        return "/static"
    return path if path in ENDPOINTS else "other"


class MetricsMiddleware:
    """Counts every response by endpoint and status, timed to its last body byte (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, done = time.perf_counter(), [500], [False]

        async def wrapped(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not done[0]:
                done[0] = True
                self.metrics.record(_endpoint(scope["path"]), status[0], time.perf_counter() - start)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, wrapped)
        finally:
            self.metrics.in_flight -= 1
            if not done[0]:  # the client went away before the end of the response
                self.metrics.record(_endpoint(scope["path"]), status[0], time.perf_counter() - start)
