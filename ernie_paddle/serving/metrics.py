"""The server's Prometheus metrics, in a registry of its own (so several servers in one process never collide).

Requests by endpoint and status, prompt and generated tokens, the engine's queue depth and running batch and its
model seconds and tokens in decode and prefill steps and the prefix cache's prompt tokens looked up and found, its
bytes and its bound (read at scrape time), and histograms of the time to the first token and of the time between
tokens.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds


class ServerMetrics:
    """Counters and histograms the routes update; gauges that read `engine` when scraped."""

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ernie_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("ernie_prompt_tokens", "Prompt tokens of requests the engine accepted", registry=r)
        self.generation_tokens = Counter("ernie_generation_tokens", "Tokens generated", registry=r)
        Gauge("ernie_num_requests_waiting", "Requests waiting in the engine's queue", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("ernie_num_requests_running", "Requests in the running batch (decoding or being prefilled)",
              registry=r).set_function(lambda: engine.batch_size)
        self.ttft = Histogram("ernie_time_to_first_token_seconds", "From submission to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("ernie_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        r.register(_EngineTotals(engine))
        r.register(_PrefixCacheTotals(engine))

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineTotals:
    """The engine's model time and tokens by kind of step, read when scraped (decode tok/s = tokens / seconds)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        t = self.engine.totals
        for kind in ("decode", "prefill"):
            yield CounterMetricFamily(f"ernie_engine_{kind}_seconds", f"Seconds the model spent in {kind} steps",
                                      value=getattr(t, f"{kind}_seconds"))
            yield CounterMetricFamily(f"ernie_engine_{kind}_tokens", f"Tokens the model ran in {kind} steps",
                                      value=getattr(t, f"{kind}_tokens"))


class _PrefixCacheTotals:
    """The prefix cache's counts, read when scraped (hit rate = hits / queries, both in prompt tokens)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        pool = self.engine.prefix
        yield CounterMetricFamily("ernie_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=pool.queried_tokens)
        yield CounterMetricFamily("ernie_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)",
                                  value=pool.hit_tokens)
        yield GaugeMetricFamily("ernie_prefix_cache_bytes", "Bytes of keys and values the prefix cache holds",
                                value=pool.nbytes)
        yield GaugeMetricFamily("ernie_prefix_cache_max_bytes", "The prefix cache's bound in bytes "
                                "(--prefix-cache-memory; 0: off)", value=pool.max_bytes)


class CountRequests:
    """ASGI middleware: counts each HTTP request by endpoint (a route's path, else "other") and status code."""

    def __init__(self, app, metrics: ServerMetrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]  # what the client sees when the app fails before answering

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
