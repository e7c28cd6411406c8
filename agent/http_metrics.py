"""The HTTP edge on the data plane's `/metrics`: the byte budget, the fast path, refused connections.

Read at scrape time from the objects that keep the counts (no second copy), so an
operator sees why requests got 503 before reaching a model (the body budget, the
connection cap) and how many waited for room, which the per-model metrics cannot show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .admission import ByteBudget
from .fast_http import FastFront


class HttpEdgeCollector(Collector):
    def __init__(self, budget: ByteBudget, front: FastFront | None, refused_connections: Callable[[], int]) -> None:
        self._budget = budget
        self._front = front
        self._refused_connections = refused_connections

    def collect(self) -> Iterator[Metric]:
        b = self._budget
        yield GaugeMetricFamily("outpost_http_body_budget_bytes", "Request body bytes the edge may hold at once.",
                                value=b.limit_bytes)
        yield GaugeMetricFamily("outpost_http_body_bytes_in_flight", "Request body bytes held now.", value=b.in_flight)
        yield GaugeMetricFamily("outpost_http_body_budget_waiting", "Requests waiting for room in the body budget.",
                                value=b.waiting)
        counters = [
            ("outpost_http_body_budget_waited", "Requests that waited for room in the body budget.", b.waited),
            ("outpost_http_body_budget_refused", "Requests answered 503 by the body budget.", b.refused),
            ("outpost_http_body_budget_refused_after_wait",
             "Requests answered 503 by the body budget after waiting for room.", b.refused_after_wait),
            ("outpost_http_refused_connections", "Connections over the cap, answered 503 and closed.",
             self._refused_connections()),
        ]
        if self._front is not None:
            counters += [
                ("outpost_http_fast_requests", "Inference requests answered on the fast path.", self._front.served),
                ("outpost_http_fast_handed_off", "Connections handed from the fast path to aiohttp.",
                 self._front.handed_off),
            ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
