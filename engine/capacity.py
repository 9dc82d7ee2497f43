"""Capacity: how much Redis memory the queue uses, per execution, and when it will be full.

Read at a glance by ``flowchat queue stats``, exported on ``/metrics`` (refreshed once a
minute by every daemon process) and warned about once when Redis would be full within a
day at the current rate. Numbers come from ``INFO memory`` of the server (or Cluster node)
holding the queue, ``MEMORY USAGE`` of a sample of execution hashes (the newest live and the
newest finished ones, found through the per-status indexes) and of the indexes (an execution's
bytes are its hash's plus its index entry's), and the indexes' creation times (for the rate).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import Gauge
from redis.exceptions import RedisError, ResponseError

from flowchat.metrics import Metrics
from flowchat.queue import FINISHED, LIVE, Queue

log = logging.getLogger("flowchat.capacity")

SAMPLE = 50
RATE_WINDOW = 3600.0
DAY = 86400.0


@dataclass(frozen=True)
class Capacity:
    """Memory facts of one queue's Redis (bytes, executions per second, seconds)."""

    used_memory_bytes: int
    maxmemory_bytes: int
    maxmemory_policy: str
    executions: int
    bytes_per_live_execution: float | None
    bytes_per_finished_execution: float | None
    executions_per_second: float
    full_in_seconds: float | None
    """At the current rate and size per execution; None without a maxmemory or without traffic."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def measure(queue: Queue, now: float | None = None) -> Capacity:
    now = time.time() if now is None else now
    info = await _memory_info(queue)
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    total, recent = await _counts(queue, now)
    rate = recent / RATE_WINDOW
    live, finished = await _sizes(queue)
    per_execution = finished if finished is not None else live
    full_in = None
    if limit and rate > 0 and per_execution:
        full_in = max(0.0, (limit - used) / (rate * per_execution))
    return Capacity(
        used_memory_bytes=used,
        maxmemory_bytes=limit,
        maxmemory_policy=str(info.get("maxmemory_policy", "")),
        executions=total,
        bytes_per_live_execution=live,
        bytes_per_finished_execution=finished,
        executions_per_second=round(rate, 3),
        full_in_seconds=None if full_in is None else round(full_in, 1),
    )


async def _memory_info(queue: Queue) -> dict[str, Any]:
    redis: Any = queue.redis
    if hasattr(redis, "get_node_from_key"):  # Cluster: the node that owns this queue's hash tag
        node = redis.get_node_from_key(queue.keys.ready)
        info = await redis.info("memory", target_nodes=node)
        return dict(next(iter(info.values()))) if info and "used_memory" not in info else dict(info)
    return dict(await redis.info("memory"))


async def _counts(queue: Queue, now: float) -> tuple[int, int]:
    """Executions kept, and those created within the rate window, summed over every index."""
    pipe = queue.redis.pipeline(transaction=False)
    for index in await queue.indexes():
        pipe.zcard(index)
        pipe.zcount(index, now - RATE_WINDOW, now)
    replies = [int(reply) for reply in await pipe.execute()]
    return sum(replies[::2]), sum(replies[1::2])


async def _sizes(queue: Queue) -> tuple[float | None, float | None]:
    """Bytes per execution, live and finished apart: the average ``MEMORY USAGE`` of the newest
    executions' hashes, plus what one entry of their indexes takes on average."""
    sizes: list[float | None] = []
    try:
        for statuses in (LIVE, FINISHED):
            indexes = [index for status in statuses for index in await queue.indexes(status=status)]
            sample: list[int] = []
            for execution_id, _ in await queue.newest(indexes, SAMPLE):
                size = await queue.redis.memory_usage(queue.keys.execution(execution_id))
                if size is not None:
                    sample.append(int(size))
            mean = _mean(sample)
            sizes.append(None if mean is None else round(mean + await _index_entry(queue, indexes), 1))
    except ResponseError:
        return None, None  # MEMORY is renamed or disabled on some managed Redis
    return sizes[0], sizes[1]


async def _index_entry(queue: Queue, indexes: list[str]) -> float:
    """Average bytes of one entry of ``indexes`` (sampled by Redis)."""
    pipe = queue.redis.pipeline(transaction=False)
    for index in indexes:
        pipe.memory_usage(index)
        pipe.zcard(index)
    replies = await pipe.execute()
    entries = sum(int(count) for count in replies[1::2])
    return sum(int(size or 0) for size in replies[::2]) / entries if entries else 0.0


def _mean(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


def lines(capacity: Capacity) -> list[str]:
    """The human lines ``flowchat queue stats`` prints."""

    def size(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f} B"

    limit = f"{capacity.maxmemory_bytes / 2**20:,.1f} MiB" if capacity.maxmemory_bytes else "no limit"
    full = "-" if capacity.full_in_seconds is None else _duration(capacity.full_in_seconds)
    return [
        f"{'memory':<10} {capacity.used_memory_bytes / 2**20:,.1f} MiB used of {limit} "
        f"(policy {capacity.maxmemory_policy or '?'})",
        f"{'per exec':<10} live {size(capacity.bytes_per_live_execution)}, "
        f"finished {size(capacity.bytes_per_finished_execution)} ({capacity.executions:,} kept)",
        f"{'rate':<10} {capacity.executions_per_second:,.2f} executions/s over the last hour; full in {full}",
    ]


def _duration(seconds: float) -> str:
    for unit, size in (("d", DAY), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


class CapacityGauges:
    """``flowchat_redis_memory_*`` and ``flowchat_execution_bytes`` on a process's /metrics."""

    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.used = Gauge("flowchat_redis_memory_used_bytes", "Redis used_memory (the queue's node)", registry=registry)
        self.limit = Gauge("flowchat_redis_maxmemory_bytes", "Redis maxmemory (0: no limit)", registry=registry)
        self.per_execution = Gauge(
            "flowchat_execution_bytes", "Redis bytes per execution (sampled), live or finished", ["state"],
            registry=registry,
        )  # fmt: skip
        self.full_in = Gauge(
            "flowchat_redis_full_in_seconds",
            "Projected seconds until Redis is full at the current rate (absent without maxmemory or traffic)",
            registry=registry,
        )

    def set(self, capacity: Capacity) -> None:
        self.used.set(capacity.used_memory_bytes)
        self.limit.set(capacity.maxmemory_bytes)
        for state, value in (
            ("live", capacity.bytes_per_live_execution),
            ("finished", capacity.bytes_per_finished_execution),
        ):
            if value is not None:
                self.per_execution.labels(state).set(value)
        self.full_in.set(capacity.full_in_seconds if capacity.full_in_seconds is not None else float("nan"))


async def watch(queue: Queue, metrics: Metrics, every: float = 60.0) -> None:
    """Refresh the gauges once a minute; warn once when Redis would be full within a day."""
    gauges = CapacityGauges(metrics)
    warned = False
    while True:
        try:
            capacity = await measure(queue)
            gauges.set(capacity)
            soon = capacity.full_in_seconds is not None and capacity.full_in_seconds < DAY
            if soon and not warned:
                log.warning(
                    "redis will be full in %s at %.1f executions/s (%s of %s used); raise maxmemory, "
                    "shorten FLOWCHAT_RETENTION_*, or add Cluster partitions",
                    _duration(capacity.full_in_seconds or 0.0),
                    capacity.executions_per_second,
                    f"{capacity.used_memory_bytes / 2**20:,.0f} MiB",
                    f"{capacity.maxmemory_bytes / 2**20:,.0f} MiB",
                )
            warned = soon
        except (RedisError, OSError):
            pass  # the loops that need Redis report the outage
        except Exception:  # advisory only: never let it stop the daemon
            log.debug("capacity check failed", exc_info=True)
        await asyncio.sleep(every)
