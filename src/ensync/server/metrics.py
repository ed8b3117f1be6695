"""Prometheus metrics of the engine, rendered at scrape time.

Nothing is counted twice: the collector reads the engine's own counters and
gauges when ``/metrics`` is scraped, so the hot path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ensync.server.runtime.engine import Engine

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = {
    "published": "Messages stored (one per recipient)",
    "delivered": "Deliveries to clients, redeliveries included",
    "redelivered": "Deliveries after the first attempt",
    "acked": "Messages acknowledged",
    "deferred": "Defer requests honoured",
    "discarded": "Messages discarded to the dead-letter list",
    "dead_lettered": "Messages dead-lettered after max_deliveries",
    "expired": "Messages dropped because their TTL passed",
    "connects": "Successful client connects",
    "rejected": "Refused connects (bad or revoked app key)",
    "deduplicated": "Publishes answered with an earlier idem (idempotency key seen)",
    "denied": "Requests refused by an app's publish/subscribe rules",
    "subscribe_refusals": "Subscribe requests refused (bad name, denial, limit, unknown client)",
    "observed": "Copies of new messages sent to observers (ensync tail)",
    "observed_missed": "Copies dropped because an observer read too slowly",
}

_LIMITS = (
    "payload_size",
    "metadata_size",
    "name_length",
    "clients_per_app",
    "subscriptions_per_client",
    "request_rate",
    "connections",
    "connections_per_address",
)


class _EngineCollector(Collector):
    def __init__(
        self, engine: Engine, backlog: Mapping[str, int], names: Mapping[str, str]
    ) -> None:
        self._engine = engine
        self._backlog = backlog
        self._names = names

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._engine.stats
        for field, text in _COUNTERS.items():
            yield CounterMetricFamily(f"ensync_{field}", text, value=getattr(stats, field))
        limits = CounterMetricFamily(
            "ensync_limit_rejections", "Requests refused by a configured limit", labels=["limit"]
        )
        counts = stats.limit_rejections
        for limit in sorted({*_LIMITS, *counts}):
            limits.add_metric([limit], counts.get(limit, 0))
        yield limits
        health = self._engine.store_health
        failures = CounterMetricFamily(
            "ensync_store_failures",
            "Store operations that failed (the client heard 'retry later'), by operation",
            labels=["operation"],
        )
        for operation, count in sorted(health.failures.items()):
            failures.add_metric([operation], count)
        yield failures
        yield GaugeMetricFamily(
            "ensync_store_failing",
            "1 while the store fails writes (the last one failed), else 0",
            value=0 if health.failing_since_ms is None else 1,
        )
        gauges = self._engine.statistics()
        yield GaugeMetricFamily(
            "ensync_connected_clients", "Clients with a live session", value=gauges.sessions
        )
        yield GaugeMetricFamily(
            "ensync_in_flight", "Deliveries awaiting a settlement", value=gauges.in_flight
        )
        yield GaugeMetricFamily(
            "ensync_deferred",
            "Partitions waiting for a deferral or a redelivery backoff to end",
            value=gauges.deferred,
        )
        backlog = GaugeMetricFamily(
            "ensync_backlog", "Pending (unsettled) messages per recipient app", labels=["app"]
        )
        for app_id, count in sorted(self._backlog.items()):
            backlog.add_metric([self._names.get(app_id, app_id)], count)
        yield backlog


async def render_metrics(engine: Engine) -> bytes:
    """The Prometheus text exposition of the engine's metrics."""
    backlog = await engine.store.backlog()
    names = {app.app_id: app.name for app in await engine.store.list_apps()}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(engine, backlog, names))
    return generate_latest(registry)
