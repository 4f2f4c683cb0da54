"""Prometheus metrics, one registry per app (so several apps in one process, as in tests, do not collide).

requests and latency by route, bytes in and out, pairs reduced and the last pairs/s, jobs by state, plan-cache
hits and misses (plans are the compiled form of a formula; the backends cache kernels per plan key). Per tenant:
requests by status and jobs by state (tenant names come from the server's configuration, so label counts stay
bounded; a request that authenticated as no tenant counts as "-").
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kred_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram("kred_request_seconds", "HTTP request latency", ["route"], buckets=BUCKETS,
                                 registry=r)
        self.bytes_in = Counter("kred_request_bytes", "request body bytes", ["route"], registry=r)
        self.bytes_out = Counter("kred_response_bytes", "response body bytes", ["route"], registry=r)
        self.shared_bytes = Counter("kred_shared_memory_bytes", "bytes read or written through shared memory",
                                    ["direction"], registry=r)
        self.pairs = Counter("kred_pairs", "i-j pairs reduced", ["source"], registry=r)
        self.pairs_rate = Gauge("kred_pairs_per_second", "pairs per second of the last finished reduction",
                                registry=r)
        self.reductions = Counter("kred_reductions", "reductions finished", ["source", "outcome"], registry=r)
        self.tenant_requests = Counter("kred_tenant_requests", "HTTP requests per tenant", ["tenant", "status"],
                                       registry=r)

    def watch(self, jobs: Callable[[], dict[str, int]], plan_cache: Callable[[], tuple[int, int]]) -> None:
        """Gauges read when scraped: jobs by state (from the store) and plan-cache hits/misses."""
        self.registry.register(_Live(jobs, plan_cache))

    def watch_tenants(self, jobs: Callable[[], dict[tuple[str, str], int]]) -> None:
        """A gauge read when scraped: jobs by tenant and state."""
        self.registry.register(_TenantJobs(jobs))

    def reduced(self, source: str, pairs: int, seconds: float) -> None:
        self.pairs.labels(source).inc(pairs)
        self.reductions.labels(source, "ok").inc()
        if seconds > 0:
            self.pairs_rate.set(pairs / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    def __init__(self, jobs, plan_cache):
        self.jobs, self.plan_cache = jobs, plan_cache

    def collect(self):
        family = GaugeMetricFamily("kred_jobs", "jobs by state", labels=["state"])
        for state, count in self.jobs().items():
            family.add_metric([state], count)
        yield family
        hits, misses = self.plan_cache()
        cache = CounterMetricFamily("kred_plan_cache", "plan cache lookups", labels=["result"])
        cache.add_metric(["hit"], hits)
        cache.add_metric(["miss"], misses)
        yield cache


class _TenantJobs:
    def __init__(self, jobs):
        self.jobs = jobs

    def collect(self):
        family = GaugeMetricFamily("kred_tenant_jobs", "jobs by tenant and state", labels=["tenant", "state"])
        for (tenant, state), count in sorted(self.jobs().items()):
            family.add_metric([tenant, state], count)
        yield family


class Middleware:
    """ASGI layer recording every HTTP request (route template, not the raw path, to keep label counts bounded)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, sent, received = 500, 0, 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def counting_send(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            m = self.metrics
            m.requests.labels(scope["method"], route, str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)
            m.bytes_in.labels(route).inc(received)
            m.bytes_out.labels(route).inc(sent)
            tenant = scope.get("state", {}).get("tenant")
            m.tenant_requests.labels(getattr(tenant, "name", tenant or "-"), str(status)).inc()
