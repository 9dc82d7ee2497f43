"""The analytics sink: events stream → Parquet, off the hot path.

Guarantees:

- **One active sink per deployment.** A sink works only while it holds the lease key (SET NX with a
  TTL, renewed by compare-and-extend); others wait and take over when it lapses. All sinks read
  through one consumer (``sink``) of the ``analytics`` group, so a new holder first re-reads what
  the last one read but did not acknowledge.
- **At least once from the stream, exactly once in the views.** Entries are acknowledged (XACK)
  only after their Parquet file is written and fsynced; a sink killed mid-batch re-reads them.
  Event ids make the redone rows disappear (see :mod:`flowchat.warehouse`).
- **Trimming** (the sink owns it): after each acknowledgement the stream is trimmed (XTRIM MINID,
  approximate) to the oldest entry the group has not acknowledged — never further.
- **Batches** by size (``FLOWCHAT_ANALYTICS_BATCH``) and time (``FLOWCHAT_ANALYTICS_FLUSH`` seconds
  after a batch's first event), so an idle system shows an event within about that time.
- A slow or stopped sink never slows executions: events wait in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from flowchat.keys import EVENTS_GROUP, Keys
from flowchat.settings import Settings
from flowchat.warehouse import Warehouse, entries_table

log = logging.getLogger("flowchat.sink")

GROUP = EVENTS_GROUP
CONSUMER = "sink"

# Extend the lease only while we still hold it (a lapsed lease taken by another sink stays theirs).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Acknowledge what the consumer holds between two ids (one batch: entries are delivered in
# order), so a batch of thousands is acknowledged without sending each id.
_ACK_RANGE = """
local acked = 0
while true do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[4], 1000, ARGV[2])
  local n = #pending
  if n == 0 then break end
  local ids = {}
  for i = 1, n do ids[i] = pending[i][1] end
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  if n < 1000 then break end
end
return acked
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class SinkSettings:
    """How the sink batches and maintains the store."""

    data_dir: Path
    batch: int = 5000
    flush: float = 1.0
    retention_days: int = 0
    compact_every: float = 60.0
    lease_ttl: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SinkSettings:
        return cls(
            data_dir=settings.data_dir,
            batch=settings.analytics_batch,
            flush=settings.analytics_flush,
            retention_days=settings.analytics_retention_days,
            compact_every=settings.analytics_compact_every,
            lease_ttl=max(0.3, settings.analytics_lease),
        )


@dataclass
class SinkStats:
    """What a sink did: stream entries and batches written, the rows (events) they held, seconds
    writing, first read and last ack (monotonic)."""

    events: int = 0
    rows: int = 0
    batches: int = 0
    write_seconds: float = 0.0
    first_read: float = 0.0
    last_ack: float = 0.0


class Sink:
    """Consumes the events stream into a :class:`Warehouse` while holding the sink lease."""

    def __init__(self, redis: Redis, keys: Keys, settings: SinkSettings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = SinkStats()
        self._stopping = asyncio.Event()
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._reader = _raw_reader(redis)
        self._ack_range = redis.register_script(_ACK_RANGE)
        self._warehouse: Warehouse | None = None
        self._last_maintenance = time.monotonic()

    def stop(self) -> None:
        """Finish the batch in hand, release the lease and return from :meth:`run`."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Wait for the lease, then consume until stopped; on losing the lease, wait again."""
        self._warehouse = await asyncio.to_thread(Warehouse, self.settings.data_dir)
        try:
            await asyncio.to_thread(self._warehouse.publish, True)
            while not self._stopping.is_set():
                if await self._acquire():
                    await self._lead()
                else:
                    await self._sleep(self.settings.lease_ttl / 3)
        finally:
            self._warehouse.close()
            try:
                await self._release(keys=[self.keys.sink_lease], args=[self.owner])
            except RedisError:
                pass  # the lease lapses by itself

    async def _acquire(self) -> bool:
        ttl_ms = int(self.settings.lease_ttl * 1000)
        if await self.redis.set(self.keys.sink_lease, self.owner, nx=True, px=ttl_ms):
            log.info("analytics sink %s holds the lease; writing to %s", self.owner, self.settings.data_dir)
            return True
        return bool(await self._renew(keys=[self.keys.sink_lease], args=[self.owner, ttl_ms]))

    async def _lead(self) -> None:
        """Consume while the lease holds: pending entries first (a predecessor's), then new ones."""
        await self._ensure_group()
        lease = asyncio.create_task(self._keep_lease())
        try:
            await self._consume("0")
            await self._consume(">")
        finally:
            lease.cancel()
            await asyncio.gather(lease, return_exceptions=True)

    async def _keep_lease(self) -> None:
        ttl_ms = int(self.settings.lease_ttl * 1000)
        while True:
            await asyncio.sleep(self.settings.lease_ttl / 3)
            if not await self._renew(keys=[self.keys.sink_lease], args=[self.owner, ttl_ms]):
                log.warning("analytics sink %s lost its lease; another sink takes over", self.owner)
                return

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.events, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _consume(self, start: str) -> None:
        """Read from ``start`` ("0": our pending entries until none are left; ">": new ones until stopped).

        The next batch is read while the last one is written (one write in flight at a time).
        """
        batch: list[tuple[bytes, list[bytes]]] = []
        first_at = 0.0
        writing: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set() and await self._holding():
                wait = self.settings.flush - (time.monotonic() - first_at) if batch else self.settings.flush
                entries = await self._read(start, self.settings.batch - len(batch), max(wait, 0.001))
                if entries and not batch:
                    first_at = time.monotonic()
                    self.stats.first_read = self.stats.first_read or first_at
                batch += entries
                if start == "0" and not entries:
                    break
                due = batch and time.monotonic() - first_at >= self.settings.flush
                if len(batch) >= self.settings.batch or due or (start == "0" and batch):
                    if writing is not None:
                        await writing
                    writing, batch = asyncio.create_task(self._flush(batch)), []
                    if start == "0":  # the pending list only shrinks once the batch is acknowledged
                        await writing
                if writing is None or writing.done():
                    await self._maintain()
        finally:
            if writing is not None:
                await writing
        if batch and await self._holding():
            await self._flush(batch)

    async def _holding(self) -> bool:
        return bool(await self.redis.get(self.keys.sink_lease) == self.owner.encode())

    async def _read(self, start: str, count: int, wait: float) -> list[tuple[bytes, list[bytes]]]:
        """Up to ``count`` entries as (id, flat field list), blocking up to ``wait`` for new ones."""
        block = None if start == "0" else max(1, int(wait * 1000))
        try:
            reply = await self._reader.xreadgroup(GROUP, CONSUMER, {self.keys.events: start}, count=count, block=block)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted under us (FLUSHALL): make it again
                await self._ensure_group()
                return []
            raise
        entries: list[tuple[bytes, list[bytes]]] = []
        for _, items in _streams(reply):
            if all(fields and isinstance(fields, list) for _, fields in items):
                entries += items  # the common case: as Redis sent them
                continue
            for entry_id, fields in items:
                if fields:  # a pending entry trimmed away comes back empty: nothing to write
                    entries.append((entry_id, fields if isinstance(fields, list) else _flat(fields)))
                else:
                    await self.redis.xack(self.keys.events, GROUP, entry_id)
        return entries

    async def _flush(self, batch: list[tuple[bytes, list[bytes]]]) -> None:
        """Write, then acknowledge, then trim: nothing is acknowledged before it is on disk."""
        assert self._warehouse is not None
        warehouse = self._warehouse
        started = time.perf_counter()
        name = batch[0][0].decode()

        def write() -> int:
            table = entries_table([f for _, f in batch], [i for i, _ in batch])
            warehouse.write(table, name)
            return int(table.num_rows)

        self.stats.rows += await asyncio.to_thread(write)
        self.stats.write_seconds += time.perf_counter() - started
        bounds = [batch[0][0], batch[-1][0]]
        await self._ack_range(keys=[self.keys.events], args=[GROUP, CONSUMER, *bounds])
        self.stats.events += len(batch)
        self.stats.batches += 1
        self.stats.last_ack = time.monotonic()
        await self._trim()

    async def _trim(self) -> None:
        """XTRIM MINID to the oldest unacknowledged entry (or the last delivered one when none is pending)."""
        pending = await self.redis.xpending(self.keys.events, GROUP)
        if pending and pending.get("pending"):
            oldest = pending["min"]
        else:
            groups = await self.redis.xinfo_groups(self.keys.events)
            ours = [g for g in groups if _text(g.get("name")) == GROUP]
            if not ours:
                return
            oldest = ours[0]["last-delivered-id"]
        await self.redis.xtrim(self.keys.events, minid=_text(oldest), approximate=True)

    async def _maintain(self) -> None:
        """Compaction and retention, every ``compact_every`` seconds, between batches."""
        if time.monotonic() - self._last_maintenance < self.settings.compact_every:
            return
        self._last_maintenance = time.monotonic()
        assert self._warehouse is not None
        await asyncio.to_thread(self._warehouse.compact)
        await asyncio.to_thread(self._warehouse.expire, self.settings.retention_days, int(time.time() * 1000))
        await asyncio.to_thread(self._warehouse.publish)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass


def _raw_reader(redis: Redis) -> Redis:
    """A client on the same connections whose XREADGROUP replies stay as Redis sent them.

    redis-py turns each entry's fields into a dict, which costs more than everything else the sink
    does per event; the warehouse reads the flat list directly. Cluster clients keep the dicts.
    """
    pool = getattr(redis, "connection_pool", None)
    if pool is None or not isinstance(redis, Redis):
        return redis
    reader = Redis(connection_pool=pool)
    reader.set_response_callback("XREADGROUP", lambda response, **options: response)
    return reader


def _streams(reply: Any) -> list[tuple[Any, list[Any]]]:
    """XREADGROUP's reply as (stream, entries) pairs: RESP2 gives a list, RESP3 (or a parsed reply) a dict."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(stream, items) for stream, items in reply]


def _flat(fields: dict[Any, Any]) -> list[bytes]:
    return [x for pair in fields.items() for x in pair]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def run_sink(sink: Sink, retry_after: float = 1.0, ceiling: float = 30.0) -> None:
    """Run a sink until stopped, riding out any failure (Redis away, a full disk) with a growing pause.

    Analytics is off the hot path: a failing sink never stops the daemon; its events wait in Redis.
    """
    pause = retry_after
    while not sink.stopping:
        try:
            await sink.run()
            return
        except (RedisError, OSError) as exc:
            log.warning("analytics sink: %r; retrying in %.0f s", exc, pause)
        except Exception:
            log.exception("analytics sink failed; retrying in %.0f s", pause)
        await sink._sleep(pause)
        pause = min(ceiling, pause * 2)
