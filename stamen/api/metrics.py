"""Prometheus metrics of ``stamen api``, served at ``/metrics`` on the API's own port.

Requests by route template, method and status, their latency (to the end of the response: a
streamed reply's last event), requests in progress, the time to the first text of a generation
(streamed or not), and the prompt and completion tokens of finished generations. The API keeps
them in its own prometheus_client registry (several apps in one process do not mix their numbers).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
UNMATCHED = "unmatched"
"""The route label of requests no route matched (their paths are not labels: any client could
make up as many as it likes)."""


class APIMetrics:
    """The API's metrics in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("stamen_api_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("stamen_api_request_seconds",
                                 "Seconds from a request's arrival to the end of its response, by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_progress = Gauge("stamen_api_requests_in_progress", "HTTP requests being answered", registry=registry)
        self.first_token = Histogram("stamen_api_time_to_first_token_seconds",
                                     "Seconds from a generation request's arrival to its first text, by route and "
                                     "whether it streamed", ["route", "stream"], buckets=LATENCY_BUCKETS,
                                     registry=registry)
        self.tokens = Counter("stamen_api_tokens", "Tokens of finished generations, by kind (prompt, completion)",
                              ["kind"], registry=registry)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request by the route it matched (its path template),
    timing it to the end of the response body (so a streamed reply counts until its last event),
    and leaving its arrival time in the request's state (``request.state.arrived``)."""

    def __init__(self, app, metrics: APIMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        scope.setdefault("state", {})["arrived"] = arrived
        status = 500  # unless a response starts

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.in_progress.dec()
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route, scope["method"]).observe(time.perf_counter() - arrived)
