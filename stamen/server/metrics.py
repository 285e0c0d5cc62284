"""Prometheus metrics of a span server (``stamen server --metrics-port``), through prometheus_client.

Counters and histograms are updated where the work happens (the handlers and the inference
engine call ``ServerMetrics``); gauges of the backend's state (sessions, cache, graphs) are read
at scrape time. Each server has its own registry, so several servers in one process (tests)
do not mix their numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

KINDS = ("decode", "prefill", "forward", "backward", "train")
"""What a step or call was: a decoding step (at most 8 tokens), a longer inference step, a stateless
forward or backward, a training call (forward and backward on a kept graph)."""

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 120.0)


class ServerMetrics:
    """One server's metrics in their own registry."""

    def __init__(self, peer_id: str):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.steps = Counter("stamen_steps", "Steps and calls served, by kind", ["kind"], registry=registry)
        self.tokens = Counter("stamen_tokens", "Tokens (batch × length) served, by kind", ["kind"], registry=registry)
        self.latency = Histogram("stamen_step_seconds", "Compute time of a step or call, by kind", ["kind"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.refusals = Counter("stamen_refusals", "Requests answered with a typed error, by error code", ["code"],
                                registry=registry)
        self.pushes = Counter("stamen_pushes", "Step outputs pushed to the next server", registry=registry)
        self.push_bytes = Counter("stamen_push_bytes", "Serialized bytes of those pushes", registry=registry)
        self.bytes_in = Counter("stamen_bytes_received", "Serialized bytes of requests received", registry=registry)
        self.bytes_out = Counter("stamen_bytes_sent", "Serialized bytes of replies sent", registry=registry)
        self.sessions = Gauge("stamen_open_sessions", "Inference sessions open", registry=registry)
        self.cache_used = Gauge("stamen_cache_tokens_used", "KV cache tokens reserved by open sessions",
                                registry=registry)
        self.cache_free = Gauge("stamen_cache_tokens_free", "KV cache tokens free for new sessions", registry=registry)
        self.batch_size = Histogram("stamen_batch_steps", "Session steps (or prefill chunks) computed together "
                                    "per batched iteration", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
                                    registry=registry)
        self.batch_rows = Histogram("stamen_batch_rows", "Rows (sequences × new tokens) per batched iteration",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=registry)
        self.queued = Gauge("stamen_queued_steps", "Inference steps waiting for compute", registry=registry)
        self.train_graphs = Gauge("stamen_train_graphs_held", "Training graphs held between forward and backward",
                                  registry=registry)
        self.span = Info("stamen_server", "The server's peer id, span, dtype and state", registry=registry)
        self.span.info({"peer_id": peer_id, "start": "", "end": "", "dtype": "", "state": "joining"})
        self.peer_id = peer_id

    def watch(self, backend) -> None:
        """Read the backend's state at every scrape (a ``SpanBackend``)."""
        self.sessions.set_function(lambda: len(backend.sessions))
        self.cache_free.set_function(lambda: backend.budget.tokens_left)
        self.cache_used.set_function(lambda: backend.budget.used // max(1, backend.budget.num_blocks))
        self.train_graphs.set_function(lambda: backend.train_graphs_held)
        if backend.batcher is not None:
            self.queued.set_function(lambda: backend.batcher.queued)
            backend.batcher.observe = self.batched

    def batched(self, steps: int, rows: int) -> None:
        self.batch_size.observe(steps)
        self.batch_rows.observe(rows)

    def set_state(self, state: str, start: int, end: int, dtype: str) -> None:
        self.span.info({"peer_id": self.peer_id, "start": str(start), "end": str(end), "dtype": dtype,
                        "state": state})

    def served(self, kind: str, tokens: int, seconds: float) -> None:
        self.steps.labels(kind).inc()
        self.tokens.labels(kind).inc(tokens)
        self.latency.labels(kind).observe(seconds)

    def refused(self, code: str) -> None:
        self.refusals.labels(code).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` on ``host:port`` (prometheus_client's own HTTP server, on a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
