"""The events stream: what happened, for analytics to read (``{fc:events}:stream``).

One Redis stream under its own hash tag. Every entry has the fields ``id``, ``type``
(execution | node_runs | node_run | metric | contact | message | batch), ``ts`` (epoch ms),
``flow``, ``execution_id``, ``node`` ("" when none) and ``data`` (a JSON object). Analytics
reads it through the consumer group ``analytics``; :func:`unpack` turns an entry back into
the events it holds, one row each:

- **batch**: the events appended in one event-loop turn leave as one entry,
  ``data.events`` (a list of ``{type, ts, flow, execution_id, node, data}``), so a busy
  worker writes one entry per round trip rather than one per event;
- **node runs ride their execution's writes**: a worker's write of an execution carries the
  node runs settled since its last one (``node_runs``, ``data.runs``), and the last write the
  ``execution`` event carrying the rest; each run becomes a ``node_run`` row.

An event's identity is its stream entry id (unique, assigned by Redis, the same when the sink
reads it again) and its place in the entry; ``id`` is left empty by the engine's writers.

Guarantees and costs:

- **No extra round trip.** An append is an ``XADD`` queued on an auto-pipeline
  (:class:`~flowchat.pipeliner.Pipeliner`): the worker passes its queue's pipeline, so a node's
  events travel in the same write as its checkpoint. Appends are not awaited by callers.
- **Nothing unread is trimmed.** The group is created (from the start of the stream) on
  setup; :meth:`Events.trim` removes only entries older than the oldest entry the group has
  not acknowledged, so a stopped sink makes the stream grow rather than lose events.
- **Off means off.** With ``FLOWCHAT_ANALYTICS=off`` nothing is written at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from flowchat.keys import EVENTS_GROUP, Keys
from flowchat.pipeliner import Pipeliner

log = logging.getLogger("flowchat.events")
TRIM_EVERY = 10.0
"""Seconds between trims of the stream (one small script; triggered by appends)."""

_TRIM = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return 0 end
local last = nil
for _, group in ipairs(groups) do
  local name, delivered = nil, nil
  for i = 1, #group, 2 do
    if group[i] == 'name' then name = group[i + 1] elseif group[i] == 'last-delivered-id' then delivered = group[i + 1] end
  end
  if name == ARGV[1] then last = delivered end
end
if not last or last == '0-0' then return 0 end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
local oldest = last
if tonumber(pending[1]) > 0 then oldest = pending[2] end
return redis.call('XTRIM', KEYS[1], 'MINID', oldest)
"""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an event comes from: flow, execution and node ids ("" for the CLI)."""

    flow: str = ""
    execution_id: str = ""
    node: str = ""


CLI = Origin()


def origin_of(source: Any) -> Origin:
    """An :class:`Origin` from itself or from anything with ``flow``, ``execution_id`` and ``node_id``
    (a node's ``NodeContext``), so nodes pass ``ctx`` without importing this module."""
    if isinstance(source, Origin):
        return source
    if source is None:
        return CLI
    return Origin(str(source.flow), str(source.execution_id), str(getattr(source, "node_id", "")))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


Event = dict[str, Any]
"""One event: ``type``, ``ts`` (epoch ms), ``flow``, ``execution_id``, ``node`` and ``data`` (a mapping)."""
MAX_BATCH = 500
"""Events per ``batch`` entry at most."""
_FIELDS = ("type", "ts", "flow", "execution_id", "node")


def entry(kind: str, origin: Origin, data: Mapping[str, Any], ts: int | None = None) -> Event:
    """One event, to append with :meth:`Events.emit_many`."""
    return {
        "type": kind,
        "ts": ts if ts is not None else now_ms(),
        "flow": origin.flow,
        "execution_id": origin.execution_id,
        "node": origin.node,
        "data": data,
    }


def stream_fields(events: list[Event]) -> list[Any]:
    """The XADD field list of one entry holding ``events``: the event itself, or a ``batch``."""
    if len(events) == 1:
        event = events[0]
        head: list[Any] = [item for name in _FIELDS for item in (name, str(event[name]))]
        return ["id", "", *head, "data", orjson.dumps(event["data"], default=str)]
    data = orjson.dumps({"events": events}, default=str)
    return ["id", "", "type", "batch", "ts", str(now_ms()), "flow", "", "execution_id", "", "node", "", "data", data]


def _fields_of_encodable(events: list[Event]) -> list[Any]:
    """:func:`stream_fields` of ``events``, leaving out (and logging) any orjson cannot write (an int
    over 64 bits, nesting over 254 levels), so one bad event costs only itself, not its turn's batch."""
    try:
        return stream_fields(events)
    except TypeError:  # orjson.JSONEncodeError
        pass
    good = []
    for event in events:
        try:
            orjson.dumps(event, default=str)
        except TypeError as exc:
            log.warning(
                "an event was not written: %s event of %s: %s", event["type"], event["execution_id"] or "-", exc
            )
        else:
            good.append(event)
    return stream_fields(good) if good else []


def unpack(fields: Mapping[bytes, bytes], base: bytes) -> list[dict[bytes, bytes]]:
    """The rows one stream entry stands for (``base`` names it: ``stream-<entry id>``).

    A ``batch`` gives each of its events (``<base>:<n>``); a ``node_runs`` entry gives a
    ``node_run`` row per run (``<base>:<n>``) and no row of its own; an ``execution`` entry
    gives its row, without the runs, then theirs. Anything else, or anything malformed, is
    the entry itself. The same entry always gives the same rows.
    """
    kind, raw = fields.get(b"type", b""), fields.get(b"data", b"")
    if not (kind == b"batch" or (kind in (b"node_runs", b"execution") and b'"runs"' in raw)):
        return [dict(fields)]
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return [dict(fields)]
    if kind == b"batch":
        events = data.get("events") if isinstance(data, dict) else None
        if not isinstance(events, list):
            return [dict(fields)]
        rows: list[dict[bytes, bytes]] = []
        for number, event in enumerate(events):
            if isinstance(event, dict):
                child = base + b":" + str(number).encode()
                values = {name.encode(): str(event.get(name, "")).encode() for name in _FIELDS}
                rows += unpack({**values, b"id": child, b"data": _json(event.get("data", {}))}, child)
        return rows
    runs = data.pop("runs", None) if isinstance(data, dict) else None
    if not isinstance(runs, list):
        return [dict(fields)]
    rows = [] if kind == b"node_runs" else [{**fields, b"data": _json(data, raw)}]
    for number, run in enumerate(runs):
        if isinstance(run, dict):
            node = str(run.pop("node", "")).encode()
            row_id = base + b":" + str(number).encode()
            rows.append({**fields, b"id": row_id, b"type": b"node_run", b"node": node, b"data": _json(run)})
    return rows


def _json(value: Any, otherwise: bytes = b"{}") -> bytes:
    """``value`` as JSON again; ``otherwise`` when orjson cannot write what it read (nesting over 254 levels):
    a hostile entry costs its own data, never the sink's progress."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError
        return otherwise


class Events:
    """Appends events to the stream (service ``events``); trims what analytics has read."""

    def __init__(self, redis: Redis, keys: Keys | None = None, *, enabled: bool = True) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.enabled = enabled
        self.pipeliner = Pipeliner.shared(redis)
        self._trim = redis.register_script(_TRIM)
        self._next_trim = time.monotonic() + TRIM_EVERY
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writes: set[asyncio.Future[Any]] = set()
        self._pending: dict[Pipeliner, list[Event]] = {}
        self._ready = False
        self.owned: AsyncExitStack | None = None
        """A connection this service opened itself (``flowchat run``), closed with it."""

    async def setup(self) -> None:
        """Create the ``analytics`` group from the stream's start (idempotent)."""
        if not self.enabled or self._ready:
            return
        try:
            await self.redis.xgroup_create(self.keys.events, EVENTS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True

    def emit(
        self, kind: str, origin: Origin | Any, data: Mapping[str, Any], *, pipeliner: Pipeliner | None = None
    ) -> None:
        """Queue one event on ``pipeliner`` (default: our own); it leaves with the next batch.

        ``origin`` is an :class:`Origin` or a node's context."""
        self.emit_many([entry(kind, origin_of(origin), data)], pipeliner=pipeliner)

    def emit_many(self, events: list[Event], *, pipeliner: Pipeliner | None = None) -> None:
        """Queue ``events``; those queued in one event-loop turn leave as one entry, on ``pipeliner``."""
        if not self.enabled or not events:
            return
        if not self._ready:
            self._spawn(self.setup())
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._append_pending)
        self._pending.setdefault(pipeliner or self.pipeliner, []).extend(events)

    def _append_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for via, events in pending.items():
            for start in range(0, len(events), MAX_BATCH):
                fields = _fields_of_encodable(events[start : start + MAX_BATCH])
                if not fields:
                    continue
                future = via.execute("XADD", self.keys.events, "*", *fields)
                self._writes.add(future)
                future.add_done_callback(self._written)
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + TRIM_EVERY
            self._spawn(self.trim())

    async def trim(self) -> int:
        """Drop entries older than the oldest the ``analytics`` group has not acknowledged."""
        try:
            return int(await self._trim(keys=[self.keys.events], args=[EVENTS_GROUP]))
        except RedisError as exc:
            log.warning("cannot trim the events stream: %s", exc)
            return 0

    async def stats(self) -> dict[str, float]:
        """Length of the stream and the age (seconds) of its oldest entry."""
        return await stream_stats(self.redis, self.keys)

    async def flush(self) -> None:
        """Wait until every queued append has been written (or failed, logged)."""
        if self._pending:
            self._append_pending()
        while self._writes or self._tasks:
            await asyncio.gather(*self._writes, *self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.flush()
        if self.owned is not None:
            await self.owned.aclose()

    def _written(self, future: asyncio.Future[Any]) -> None:
        self._writes.discard(future)
        _report(future)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def stream_stats(redis: Redis, keys: Keys) -> dict[str, float]:
    """``{"length", "age_seconds"}`` of the events stream (0 when empty)."""
    pipe = redis.pipeline(transaction=False)
    pipe.xlen(keys.events)
    pipe.xrange(keys.events, count=1)
    length, first = await pipe.execute()
    return {"length": int(length), "age_seconds": entry_age(first)}


def entry_age(first: list[Any]) -> float:
    if not first:
        return 0.0
    raw = first[0][0]
    stamp = int((raw.decode() if isinstance(raw, bytes) else str(raw)).split("-")[0])
    return max(0.0, time.time() - stamp / 1000)


def _report(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("an event was not written: %s", future.exception())


def _ms(seconds: float | None) -> int | None:
    return int(seconds * 1000) if seconds else None


def node_run(run: Any) -> dict[str, Any]:
    """One settled (or retrying) node run, as ``node_runs`` and ``execution`` events carry it."""
    status = "retried" if run.status == "waiting" else run.status
    return {
        "node": run.id,
        "node_type": run.type,
        "status": status,
        "attempt": run.attempts,
        "started_at": _ms(run.started_at),
        "duration_ms": round(run.duration_ms, 3),
        "error_code": (run.error or {}).get("code", "") if status in ("failed", "retried") else "",
    }


def node_runs_event(execution: Any, runs: list[dict[str, Any]]) -> Event:
    """A ``node_runs`` entry: node runs of ``execution`` settled since its last write."""
    return entry("node_runs", Origin(execution.flow, execution.id, ""), {"runs": runs})


def execution_event(execution: Any, trigger_type: str, runs: list[dict[str, Any]] | None = None) -> Event:
    """An ``execution`` entry for a finished execution, with the node runs settled in its last write."""
    started, finished = _ms(execution.started_at), _ms(execution.finished_at)
    data: dict[str, Any] = {
        "flow_version": execution.flow_version,
        "trigger_type": trigger_type,
        "status": execution.status,
        "started_at": started,
        "finished_at": finished,
        "duration_ms": (finished - started) if started and finished else None,
        "attempts": sum(run.attempts for run in execution.nodes.values()),
        "error_code": (execution.error or {}).get("code", "") if execution.status == "failed" else "",
    }
    if runs:
        data["runs"] = runs
    return entry("execution", Origin(execution.flow, execution.id, ""), data)
