"""HTTP request counts and latencies by route template, read from the route that served them.

A pure ASGI middleware over ``prometheus-client``. The route template comes from
``scope["route"]``, which Starlette's router sets on the request's scope when it picks a route,
so labelling costs one dictionary read after the response. (``prometheus-fastapi-instrumentator``,
used before, matched every request against the whole route table a second time before routing
it: with one route per slug and per dialect that was a third of a status poll's Python calls;
docs/PERFORMANCE.md, "API overhead by revision".) Memory only: no store call per request.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
"""Seconds; a POST /v1 lasts as long as its job, hence the long tail."""
UNMATCHED = "none"
"""The handler label of a request no route served (a 404): raw paths would be unbounded."""
LABELS = ("handler", "method", "status")


class HttpMetricsMiddleware:
    """Counts and times each HTTP request by (route template, method, status)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "qwenserve_http_requests_total",
            "HTTP requests by route template, method and status.",
            LABELS,
            registry=registry,
        )
        self.latency = Histogram(
            "qwenserve_http_request_duration_seconds",
            "Seconds from a request's arrival to the end of its response.",
            LABELS,
            buckets=HTTP_BUCKETS,
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            labels = (_template(scope), scope["method"], str(status))
            self.requests.labels(*labels).inc()
            self.latency.labels(*labels).observe(time.perf_counter() - started)


def _template(scope: Scope) -> str:
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED
