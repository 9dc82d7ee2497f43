"""Prometheus metrics of one process, plus queue depths read from Redis at scrape time."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The metric families FlowChat exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[str, ...], Any] = {}
        r = self.registry
        self.executions = Counter(
            "flowchat_executions",
            "Executions by flow and event (started, succeeded, failed, retried)",
            ["flow", "event"],
            registry=r,
        )
        self.node_duration = Histogram(
            "flowchat_node_duration_seconds",
            "Time spent running a node attempt, by node type",
            ["type", "status"],
            buckets=NODE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("flowchat_queue_depth", "Executions in the queue by state", ["state"], registry=r)
        self.dead_letters = Gauge("flowchat_dead_letters", "Entries on the dead-letter stream", registry=r)
        self.ingress = Counter(
            "flowchat_ingress_requests", "Ingress requests by route and status", ["route", "status"], registry=r
        )

    def execution_event(self, flow: str, event: str) -> None:
        """Count an execution event; label children are cached (this is on the hot path)."""
        child = self._children.get((flow, event))
        if child is None:
            child = self._children[(flow, event)] = self.executions.labels(flow, event)
        child.inc()

    def node_ran(self, node_type: str, status: str, seconds: float) -> None:
        child = self._children.get((node_type, status, "node"))
        if child is None:
            child = self._children[(node_type, status, "node")] = self.node_duration.labels(node_type, status)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def set_queue(self, stats: dict[str, int]) -> None:
        for state in ("ready", "in_flight", "delayed"):
            self.queue_depth.labels(state).set(stats[state])
        self.dead_letters.set(stats["dead"])
