"""Prometheus metrics of one process, plus queue depths read from Redis at scrape time.

Execution and node counts sit on the hot path, so they are kept in plain dicts and
turned into metric families only when ``/metrics`` is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from flowchat.backoff import REDIS

NODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(NODE_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(NODE_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        buckets, running = [], 0
        for bound, count in zip([*map(str, NODE_BUCKETS), "+Inf"], self.counts, strict=True):
            running += count
            buckets.append((bound, float(running)))
        return buckets


class _EngineCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        executions = CounterMetricFamily(
            "flowchat_executions",
            "Executions by flow and event (started, succeeded, failed, retried)",
            labels=["flow", "event"],
        )
        for (flow, event), count in sorted(self.metrics.events.items()):
            executions.add_metric([flow, event], count)
        yield executions
        durations = HistogramMetricFamily(
            "flowchat_node_duration_seconds",
            "Time spent running a node attempt, by node type",
            labels=["type", "status"],
        )
        for (node_type, status), histogram in sorted(self.metrics.durations.items()):
            durations.add_metric([node_type, status], histogram.cumulative(), histogram.total)
        yield durations
        cluster = CounterMetricFamily(
            "flowchat_cluster_executions",
            "Executions finished by every worker on this Redis (read from Redis at scrape time), by flow and outcome",
            labels=["scope", "flow", "event"],
        )
        for (flow, event), count in sorted(self.metrics.cluster_counts.items()):
            cluster.add_metric(["cluster", flow, event], count)
        yield cluster
        crashes = CounterMetricFamily(
            "flowchat_worker_task_crashes", "Execution tasks that ended in an unexpected exception (a bug: see the log)"
        )
        crashes.add_metric([], self.metrics.crashes)
        yield crashes
        errors = CounterMetricFamily("flowchat_redis_errors", "Redis calls that failed in this process's loops")
        errors.add_metric([], REDIS.errors)
        yield errors
        reconnects = CounterMetricFamily(
            "flowchat_redis_reconnects", "Times this process got Redis back after losing it"
        )
        reconnects.add_metric([], REDIS.reconnects)
        yield reconnects


class Metrics:
    """The metric families FlowChat exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.durations: defaultdict[tuple[str, str], _Histogram] = defaultdict(_Histogram)
        self.cluster_counts: dict[tuple[str, str], int] = {}
        self.crashes = 0
        self.registry.register(_EngineCollector(self))
        # the usual process_* (CPU, memory, file descriptors) and python_* (GC, version) families
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.queue_depth = Gauge(
            "flowchat_queue_depth", "Executions in the queue by state", ["state"], registry=self.registry
        )
        self.dead_letters = Gauge("flowchat_dead_letters", "Entries on the dead-letter stream", registry=self.registry)
        self.loop_stalls = Counter(
            "flowchat_event_loop_stalls",
            "Times the event loop did not turn for longer than the stall threshold (a blocking node or template)",
            registry=self.registry,
        )
        self.events_length = Gauge(
            "flowchat_events_length", "Entries on the events stream (not yet trimmed)", registry=self.registry
        )
        self.events_age = Gauge(
            "flowchat_events_age_seconds",
            "Age of the oldest entry on the events stream (grows while analytics does not read)",
            registry=self.registry,
        )
        self.ingress = Counter(
            "flowchat_ingress_requests",
            "Ingress requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )

    def execution_event(self, flow: str, event: str) -> None:
        self.events[(flow, event)] += 1

    def node_ran(self, node_type: str, status: str, seconds: float) -> None:
        self.durations[(node_type, status)].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def set_queue(self, stats: dict[str, Any]) -> None:
        for state in ("ready", "in_flight", "delayed"):
            self.queue_depth.labels(state).set(stats[state])
        self.dead_letters.set(stats["dead"])
        self.events_length.set(stats.get("events", 0))
        self.events_age.set(stats.get("events_age_seconds", 0.0))
        counts = {}
        for name, count in stats.get("counters", {}).items():
            event, _, flow = name.partition(":")
            counts[(flow, event)] = int(count)
        self.cluster_counts = counts

    def loop_stalled(self) -> None:
        """Count one event-loop stall (called from the watchdog's thread; prometheus counters are thread-safe)."""
        self.loop_stalls.inc()
