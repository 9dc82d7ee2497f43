"""The durable execution queue on Redis.

Guarantees:

- **Accepted means stored.** :meth:`Queue.enqueue` writes the execution hash,
  the index entry and the ready-stream entry in one Lua script; ingress answers
  only after it returns. A repeat of an idempotency key returns the first id.
- **At-least-once delivery; a finished node is not run again.** Workers read the ready stream
  through one consumer group. A read entry is *leased* to its worker: it stays
  in the group's pending list until the worker acknowledges it. Workers renew
  the leases they still hold while they run (a lease found taken stops their
  copy); a lease idle for longer than the visibility timeout is taken over with
  ``XAUTOCLAIM`` by another worker, and only the holder may write the outcome.
  State is checkpointed after every node, so a taken-over execution resumes at
  its first unfinished node and never re-runs a finished one. The only window
  for a repeat is a crash between a node's side effect and its checkpoint (one
  round trip); pure nodes, which have none, and idempotent ones, whose repeat is harmless,
  share the next checkpoint.
- **Waiting holds no worker.** Retry backoff and ``delay`` nodes park the
  execution in the delayed sorted set; a Lua script moves due ones back onto
  the ready stream atomically.
- **Nothing is dropped.** An execution that fails (non-retryable error or
  attempts exhausted) goes to the dead-letter stream with its error's code,
  message and node; so does one delivered more than ``max_deliveries`` times
  (poison). Entries are deleted from the ready stream only after they are
  acknowledged; streams are never trimmed with MAXLEN.
- **Bounded history.** A finished execution's hash expires after its retention
  (:class:`Retention`). A succeeded one is compacted by the same script that
  finishes it (:func:`flowchat.codec.encode_compact`: no trigger past 64 bytes, no
  outputs); a failed or cancelled one keeps its full state, so it can be replayed
  and diagnosed. A delivery of an execution that already finished is dropped.
- **One index entry per execution.** Each execution id is in the index of its flow
  and status (:meth:`Keys.index`); every script that changes a status moves it, in the
  same atomic step, and retention trims the finished ones.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

from flowchat.codec import (
    SUMMARY_FIELDS,
    Stored,
    decode_hash,
    decode_summary,
    dumps,
    encode_compact,
    encode_meta,
    encode_state,
    execution_from_parts,
    run_fields,
)
from flowchat.errors import QueueError
from flowchat.events import entry_age
from flowchat.execution import Execution, NodeRun, new_execution_id
from flowchat.flow import Flow
from flowchat.keys import GROUP, Keys
from flowchat.outcome import Outcome
from flowchat.pipeliner import Pipeliner

__all__ = [
    "DEDUPE_TTL",
    "FINISHED",
    "LIVE",
    "RETENTION",
    "RETENTION_SUCCEEDED",
    "Delivery",
    "Queue",
    "Retention",
    "StoredExecution",
    "dumps",
    "execution_from_parts",
]

DEDUPE_TTL = 24 * 3600
"""Default ``FLOWCHAT_DEDUPE_TTL``: how long an idempotency key maps to its first execution."""
STORE_AGAIN_AFTER = 60.0
RETENTION = 7 * 24 * 3600
"""The longest default retention (failed executions): index entries older than this are dropped."""
RETENTION_SUCCEEDED = 24 * 3600
"""Default ``FLOWCHAT_RETENTION_SUCCEEDED``: a finished execution's state is kept this long."""
LIVE = ("queued", "waiting")
"""Statuses an execution is stored with while it is live (a running one still reads ``queued`` or ``waiting``)."""
FINISHED = ("succeeded", "failed", "cancelled")
"""Statuses of finished executions, which retention expires."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long Redis keeps finished executions and idempotency keys (seconds; history is analytics' job)."""

    succeeded: float = RETENTION_SUCCEEDED
    failed: float = RETENTION
    dedupe: float = DEDUPE_TTL
    compact: bool = True
    """Replace a succeeded execution's state with its compact form (``FLOWCHAT_COMPACT_SUCCEEDED``)."""

    @property
    def longest(self) -> float:
        return max(self.succeeded, self.failed)

    def after(self, action: str, status: str) -> int:
        """Seconds to keep an execution that ends with ``action`` (done/dead) and ``status``; 0 while live."""
        if action == "dead" or status == "failed":
            return int(self.failed)
        return int(self.succeeded) if action == "done" else 0

    def of(self, status: str) -> float:
        """Seconds a finished execution with ``status`` stays listed (its index entry's retention)."""
        return self.failed if status == "failed" else self.succeeded


_ENQUEUE = """
if ARGV[5] == '1' then
  local first = redis.call('GET', KEYS[1])
  if first then return {first, 0} end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
end
redis.call('HSET', KEYS[2], 'm', ARGV[2], 's', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[7])
redis.call('XADD', KEYS[3], '*', 'e', ARGV[1])
return {ARGV[1], 1}
"""

# KEYS: hash, ready, delayed, dead, counters, index(queued), index(waiting), index(new status)
# ARGV[14] == '1': replace the hash (compact form); ARGV[15..]: field, value, … to write (one HSET:
# a flow has at most 1,000 nodes, well under the 8,000 values Lua's unpack can pass)
_FINISH = """
local owner = redis.call('XPENDING', KEYS[2], ARGV[8], ARGV[1], ARGV[1], 1)
if #owner == 0 or owner[1][2] ~= ARGV[12] then return 0 end
redis.call('XACK', KEYS[2], ARGV[8], ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
if ARGV[14] == '1' then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 15))
if ARGV[2] == 'wait' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
  redis.call('HSET', KEYS[1], 'd', 0)
elseif ARGV[2] == 'dead' then
  redis.call('XADD', KEYS[4], '*', 'e', ARGV[4], 'flow', ARGV[5], 'node', ARGV[6], 'code', ARGV[7], 'message', ARGV[9])
  redis.call('HINCRBY', KEYS[5], 'dead:' .. ARGV[5], 1)
end
if ARGV[10] ~= '' then redis.call('HINCRBY', KEYS[5], ARGV[10], 1) end
if KEYS[6] ~= KEYS[8] then redis.call('ZREM', KEYS[6], ARGV[4]) end
if KEYS[7] ~= KEYS[8] then redis.call('ZREM', KEYS[7], ARGV[4]) end
redis.call('ZADD', KEYS[8], ARGV[13], ARGV[4])
if ARGV[2] ~= 'wait' and tonumber(ARGV[11]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[11]) end
return 1
"""

_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'e', id)
  redis.call('ZREM', KEYS[1], id)
end
return #due
"""

# KEYS: hash, ready, index(failed), index(queued); ARGV: id, score, field, value, …
_REQUEUE = """
local state = redis.call('HGET', KEYS[1], 's')
if not state or cjson.decode(state)['status'] ~= 'failed' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('HSET', KEYS[1], 'd', 0)
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'e', ARGV[1])
return 1
"""

# KEYS: hash, delayed, counters, index(status read), index(cancelled)
_CANCEL = """
if redis.call('HGET', KEYS[1], 's') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 's', ARGV[3], 'c', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'cancelled:' .. ARGV[4], 1)
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1])
if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return 1
"""

# KEYS: hash, legacy index, index(flow, status read); ARGV: id, score, field read, its value then
_MOVE_LEGACY = """
if (redis.call('HGET', KEYS[1], ARGV[3]) or '') == ARGV[4] then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

_EXTEND = """
local lost = {}
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #entry == 1 and entry[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One ready-stream entry handed to a worker."""

    message_id: str
    execution_id: str


@dataclass(frozen=True, slots=True)
class StoredExecution:
    """An execution's stored state, as a worker picks it up."""

    delivery: Delivery
    meta: dict[str, Any] | None
    """None when nothing is stored (expired or never stored); a compact (succeeded) one has its status."""
    nodes: dict[str, dict[str, Any]]
    deliveries: int


class Queue:
    """FlowChat's queue operations over one Redis connection pool."""

    def __init__(
        self, redis: Redis, keys: Keys | None = None, *, max_deliveries: int = 5, retention: Retention | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.max_deliveries = max_deliveries
        self.retention = retention or Retention()
        self.pipeliner = Pipeliner.shared(redis)
        self._enqueue = redis.register_script(_ENQUEUE)
        self._finish = redis.register_script(_FINISH)
        self._move_due = redis.register_script(_MOVE_DUE)
        self._requeue = redis.register_script(_REQUEUE)
        self._extend = redis.register_script(_EXTEND)
        self._cancel = redis.register_script(_CANCEL)
        self._move_legacy = redis.register_script(_MOVE_LEGACY)
        self._stored_versions: dict[tuple[str, str], float] = {}

    async def _run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA through the auto-pipeline; load the script once if Redis lost it (a restart)."""
        try:
            return await self.pipeliner.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.script_load(script.script)
            return await self.pipeliner.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def setup(self) -> None:
        """Create the consumer group if it is missing, and move indexes of an older version (idempotent)."""
        try:
            await self.redis.xgroup_create(self.keys.ready, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if await self.redis.exists(self.keys.legacy_index):
            await self.move_legacy_index()

    async def move_legacy_index(self, batch: int = 500) -> int:
        """Move the one index of every execution (before per-status indexes) into the per-status ones.

        Each id goes to the index of the flow and status its hash has; an execution whose status
        changes meanwhile was already indexed by the script that changed it, and one whose state
        has expired is just forgotten. Safe to run from several processes at once.
        """
        for flow in await self.flows():
            await self.redis.delete(self.keys.legacy_flow_index(flow))  # the global one holds the same ids
        moved = 0
        while entries := await self.redis.zrange(self.keys.legacy_index, 0, batch - 1, withscores=True):
            ids = [_text(member) for member, _ in entries]
            pipe = self.redis.pipeline(transaction=False)
            for (execution_id, (raw, meta)), (_, score) in zip(
                zip(ids, await self._summaries(ids), strict=True), entries, strict=True
            ):
                if meta is None:
                    pipe.zrem(self.keys.legacy_index, execution_id)
                    continue
                field, value = ("s", raw[1] or "") if raw[0] is not None else ("z", raw[2])
                index = self.keys.index(str(meta["flow"]), str(meta["status"]))
                keys = [self.keys.execution(execution_id), self.keys.legacy_index, index]
                pipe.evalsha(self._move_legacy.sha, len(keys), *keys, execution_id, score, field, value)
                pipe.sadd(self.keys.indexed_flows, str(meta["flow"]))
                moved += 1
            await self.redis.script_load(_MOVE_LEGACY)
            await pipe.execute()
        return moved

    # --- ingress --------------------------------------------------------------------

    async def store_flow(self, flow: Flow) -> None:
        """Keep a flow version's YAML (and where it lives) so its executions survive a reload."""
        # re-stored now and then, so a Redis that lost its data (failover, flush) gets it back
        if (
            time.monotonic() - self._stored_versions.get((flow.name, flow.version), -STORE_AGAIN_AFTER)
            < STORE_AGAIN_AFTER
        ):
            return
        stored = dumps({"file": flow.file, "source": flow.source})
        await self.redis.set(self.keys.flow_source(flow.name, flow.version), stored, nx=True)
        self._stored_versions[(flow.name, flow.version)] = time.monotonic()

    async def flow_source(self, flow: str, version: str) -> tuple[str, str] | None:
        """The (file, YAML) of a stored flow version."""
        value = await self.redis.get(self.keys.flow_source(flow, version))
        if value is None:
            return None
        stored = orjson.loads(value)
        return str(stored["file"]), str(stored["source"])

    async def enqueue(
        self, flow: str, version: str, trigger: dict[str, Any], *, idempotency_key: str | None = None
    ) -> tuple[str, bool]:
        """Store and queue a new execution. Returns (execution id, created?)."""
        execution = Execution(new_execution_id(), flow, version, trigger, {}, status="queued")
        dedupe = self.keys.dedupe(f"{flow}:{idempotency_key}") if idempotency_key else self.keys.dedupe("-")
        keys = [dedupe, self.keys.execution(execution.id), self.keys.ready, *self._flow_keys(flow)]
        args: list[Any] = [
            execution.id,
            encode_meta(execution),
            execution.created_at,
            int(self.retention.dedupe),
            "1" if idempotency_key else "0",
            encode_state(execution),
            flow,
        ]
        try:
            execution_id, created = await self._run_script(self._enqueue, keys, args)
        except RedisError as exc:
            raise QueueError(f"cannot enqueue: {exc}") from exc
        return _text(execution_id), bool(created)

    async def enqueue_many(self, flow: str, version: str, triggers: list[dict[str, Any]]) -> list[str]:
        """Store and queue many executions in one round trip (no idempotency keys)."""
        await self.redis.script_load(_ENQUEUE)
        commands: list[tuple[Any, ...]] = []
        ids = []
        for trigger in triggers:
            execution = Execution(new_execution_id(), flow, version, trigger, {}, status="queued")
            keys = (
                self.keys.dedupe("-"),
                self.keys.execution(execution.id),
                self.keys.ready,
                *self._flow_keys(flow),
            )
            args = (execution.id, encode_meta(execution), execution.created_at, 0, "0", encode_state(execution), flow)
            commands.append(("EVALSHA", self._enqueue.sha, len(keys), *keys, *args))
            ids.append(execution.id)
        try:
            replies = await self.pipeliner.round_trip(commands)
        except RedisError as exc:
            raise QueueError(f"cannot enqueue: {exc}") from exc
        failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
        if failed is not None:
            raise QueueError(f"cannot enqueue: {failed}")
        return ids

    # --- workers --------------------------------------------------------------------

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        command = (
            "XREADGROUP",
            "GROUP",
            GROUP,
            consumer,
            "COUNT",
            count,
            "BLOCK",
            block_ms,
            "STREAMS",
            self.keys.ready,
            ">",
        )
        [reply] = await self.pipeliner.round_trip([command])
        if isinstance(reply, Exception):
            raise reply
        return [
            Delivery(_text(message_id), _text(fields[1]) if len(fields) > 1 else "")
            for _, entries in reply or []
            for message_id, fields in entries
        ]

    async def load(self, deliveries: list[Delivery]) -> list[StoredExecution]:
        """Count a delivery and fetch the state of each execution, in one round trip."""
        pending: list[asyncio.Future[Any]] = []
        for delivery in deliveries:  # on the auto-pipeline: with whatever else this loop turn writes
            key = self.keys.execution(delivery.execution_id)
            pending += [self.pipeliner.execute("HINCRBY", key, "d", 1), self.pipeliner.execute("HGETALL", key)]
        replies: list[Any] = await asyncio.gather(*pending, return_exceptions=True)
        failed = next((reply for reply in replies if isinstance(reply, BaseException)), None)
        if failed is not None:
            raise failed
        loaded = []
        for index, delivery in enumerate(deliveries):
            count, flat = replies[2 * index], replies[2 * index + 1]
            fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
            stored = decode_hash(fields, delivery.execution_id)
            if stored is None:
                loaded.append(StoredExecution(delivery, None, {}, int(count)))
            else:
                loaded.append(StoredExecution(delivery, stored.meta, stored.nodes, int(count)))
        return loaded

    def checkpoint(self, execution: Execution, runs: Iterable[NodeRun]) -> asyncio.Future[Any]:
        """Persist node states in one HSET (batched with other executions' checkpoints); its reply, to await.

        Commands on the auto-pipeline reach Redis in the order they were issued, so whatever this
        execution writes next is applied after this HSET, awaited or not.
        """
        return self.pipeliner.execute("HSET", self.keys.execution(execution.id), *run_fields(runs))

    async def finish(
        self, delivery: Delivery, outcome: Outcome, consumer: str, *, runs: Iterable[NodeRun] = ()
    ) -> bool:
        """Record ``outcome`` (and ``runs`` not yet checkpointed): state, acknowledgement, parking or
        dead letter, the outcome's counter and the move to the index of its new status, in one
        atomic script. A succeeded execution's state is replaced by its compact form.

        Returns False, writing nothing, when ``consumer`` no longer holds the entry's lease.
        """
        execution = outcome.execution
        letter = outcome.dead_letter
        compact = self.retention.compact and outcome.action == "done" and execution.status == "succeeded"
        fields = encode_compact(execution) if compact else ["s", encode_state(execution), *run_fields(runs)]
        keys = [
            self.keys.execution(execution.id),
            self.keys.ready,
            self.keys.delayed,
            self.keys.dead,
            self.keys.counters,
            *(self.keys.index(execution.flow, status) for status in (*LIVE, execution.status)),
        ]
        args = [
            delivery.message_id,
            outcome.action,
            execution.wake_at or 0,
            execution.id,
            execution.flow,
            letter.node if letter else "",
            letter.code if letter else "",
            GROUP,
            letter.message if letter else "",
            outcome.counter,
            self.retention.after(outcome.action, execution.status),
            consumer,
            execution.created_at,
            "1" if compact else "0",
            *fields,
        ]
        return bool(await self._run_script(self._finish, keys, args))

    async def count(self, event: str, flow: str, amount: int = 1) -> None:
        await self.pipeliner.execute("HINCRBY", self.keys.counters, f"{event}:{flow}", amount)

    async def move_due(self, now: float | None = None, limit: int = 500) -> int:
        """Move waiting executions whose time has come onto the ready stream."""
        moved = await self._move_due(keys=[self.keys.delayed, self.keys.ready], args=[now or time.time(), limit])
        return int(moved)

    async def forget_expired(self, now: float | None = None, batch: int = 1000) -> int:
        """Drop index entries of finished executions past their retention whose state has expired.

        Entries are scored by creation time, and an execution that ran for days (a drip campaign's
        ``delay``) keeps its state for the retention after it *finished*: an entry past its
        retention by score goes only once its hash is gone, so a listing shows what ``show`` finds.
        Up to ``batch`` entries per index are looked at per call (the mover calls it regularly).
        """
        now = now or time.time()
        # dead letters go with the failed executions they name (their state has expired by then)
        await self.redis.xtrim(
            self.keys.dead, minid=f"{int((now - self.retention.failed) * 1000)}-0", approximate=False
        )
        indexes = [self.keys.index(flow, status) for flow in await self.flows() for status in FINISHED]
        statuses = [status for _ in range(len(indexes) // len(FINISHED)) for status in FINISHED]
        pipe = self.redis.pipeline(transaction=False)
        for index, status in zip(indexes, statuses, strict=True):
            pipe.zrangebyscore(index, "-inf", now - self.retention.of(status), start=0, num=batch)
        candidates = [(index, _text(member)) for index, found in zip(indexes, await pipe.execute(), strict=True)
                      for member in found]  # fmt: skip
        if not candidates:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for _, execution_id in candidates:
            pipe.exists(self.keys.execution(execution_id))
        gone = [candidate for candidate, alive in zip(candidates, await pipe.execute(), strict=True) if not alive]
        pipe = self.redis.pipeline(transaction=False)
        for index, execution_id in gone:
            pipe.zrem(index, execution_id)
        return sum(int(removed) for removed in await pipe.execute()) if gone else 0

    async def next_due(self) -> float | None:
        first = await self.redis.zrange(self.keys.delayed, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int = 100) -> list[Delivery]:
        """Take over entries whose lease expired (their worker died or hung), scanning the whole pending list."""
        found: list[Delivery] = []
        cursor = "0-0"
        while len(found) < count:
            reply = await self.redis.xautoclaim(
                self.keys.ready, GROUP, consumer, min_idle_ms, cursor, count=count - len(found)
            )
            found += [_delivery(message_id, fields) for message_id, fields in reply[1] if fields]
            cursor = _text(reply[0])
            if cursor == "0-0":
                break
        return found

    async def extend(self, consumer: str, message_ids: list[str]) -> list[str]:
        """Renew leases this consumer still holds; return the ids whose lease another worker took."""
        if not message_ids:
            return []
        lost = await self._run_script(self._extend, [self.keys.ready], [GROUP, consumer, *message_ids])
        return [_text(message_id) for message_id in lost]

    async def drop_delivery(self, delivery: Delivery) -> None:
        """Acknowledge and delete an entry that is not run (its execution finished, or has no state).

        The delivery count the read added goes too: a finished hash keeps its size, and a hash
        that held nothing else (its state had expired) is gone again instead of staying forever.
        """
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.keys.ready, GROUP, delivery.message_id)
        pipe.xdel(self.keys.ready, delivery.message_id)
        pipe.hdel(self.keys.execution(delivery.execution_id), "d")
        await pipe.execute()

    async def cancel(self, execution_id: str, now: float | None = None) -> str:
        """Cancel a queued or waiting execution at once; returns its status afterwards.

        ``cancelled`` when done here (a queue entry it still has is dropped by the worker that
        reads it); ``missing`` for an unknown id; any other status is left as it is (running,
        or already finished). Atomic against a worker taking it: the state is swapped only if
        it is still the one read.
        """
        key = self.keys.execution(execution_id)
        for _ in range(5):
            [(raw, meta)] = await self._summaries([execution_id])
            if meta is None:
                return "missing"
            if meta["status"] == "running":  # stops at its next checkpoint (the worker checks the flag)
                await self.redis.hset(key, "c", "1")  # type: ignore[misc]
                return "cancelling"
            if meta["status"] not in LIVE:
                return str(meta["status"])
            execution = Execution(**{**meta, "nodes": {}, "status": "cancelled", "finished_at": now or time.time()})
            keys = [
                key,
                self.keys.delayed,
                self.keys.counters,
                self.keys.index(execution.flow, str(meta["status"])),
                self.keys.index(execution.flow, "cancelled"),
            ]
            args = [
                execution_id,
                raw[1],
                encode_state(execution),
                execution.flow,
                self.retention.after("done", "cancelled"),
                execution.created_at,
            ]
            if await self._cancel(keys=keys, args=args):
                return "cancelled"
        return "busy"

    def cancel_requested(self, execution_id: str) -> Any:
        """A future of whether ``executions cancel`` flagged this execution (rides the next pipelined write)."""
        return self.pipeliner.execute("HEXISTS", self.keys.execution(execution_id), "c")

    async def requeue(self, execution: Execution) -> bool:
        """Put a failed execution back on the ready stream with its node states (False if it is not failed)."""
        keys = [
            self.keys.execution(execution.id),
            self.keys.ready,
            self.keys.index(execution.flow, "failed"),
            self.keys.index(execution.flow, execution.status),
        ]
        fields = ["s", encode_state(execution), *run_fields(execution.nodes.values())]
        return bool(await self._requeue(keys=keys, args=[execution.id, execution.created_at, *fields]))

    # --- operators ------------------------------------------------------------------

    async def get(self, execution_id: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
        """An execution's meta (fields m and s merged) and node states, of either stored form."""
        stored = await self.stored(execution_id)
        return None if stored is None else (stored.meta, stored.nodes)

    async def stored(self, execution_id: str) -> Stored | None:
        """An execution's stored hash, decoded (``compact`` says which form it has)."""
        raw: dict[Any, Any] = await self.redis.hgetall(self.keys.execution(execution_id))  # type: ignore[misc]
        return decode_hash({_text(key): value for key, value in raw.items()}, execution_id)

    def _flow_keys(self, flow: str) -> list[str]:
        return [self.keys.index(flow, "queued"), self.keys.indexed_flows]

    async def flows(self) -> list[str]:
        """The names of the flows that have indexed executions, sorted."""
        return sorted(_text(flow) for flow in await self.redis.smembers(self.keys.indexed_flows))  # type: ignore[misc]

    async def indexes(self, flow: str | None = None, status: str | None = None) -> list[str]:
        """The index keys that hold the executions of ``flow`` (else every flow) in ``status`` (else any)."""
        flows = [flow] if flow is not None else await self.flows()
        statuses = [status] if status is not None else [*LIVE, *FINISHED]
        return [self.keys.index(name, each) for name in flows for each in statuses]

    async def total(self) -> int:
        """How many executions the indexes hold (live ones and finished ones not yet past retention)."""
        pipe = self.redis.pipeline(transaction=False)
        for index in await self.indexes():
            pipe.zcard(index)
        return sum(int(count) for count in await pipe.execute())

    async def newest(
        self, indexes: list[str], limit: int, *, offset: int = 0, since: float | None = None
    ) -> list[tuple[str, float]]:
        """The (id, created_at) of the ``limit`` newest executions across ``indexes`` after skipping ``offset``.

        Reads at most ``offset + limit`` entries of each index (created at ``since`` or later).
        """
        if not indexes or limit <= 0:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for index in indexes:
            pipe.zrevrangebyscore(index, "+inf", "-inf" if since is None else since, 0, offset + limit, withscores=True)
        lists = [[(_text(member), float(score)) for member, score in entries] for entries in await pipe.execute()]
        merged = heapq.merge(*lists, key=lambda entry: -entry[1])
        return list(itertools.islice(merged, offset, offset + limit))

    async def recent(
        self,
        limit: int,
        *,
        flow: str | None = None,
        status: str | None = None,
        since: float | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` executions (of ``flow``, in ``status``, created since ``since``), newest first,
        from ``offset`` on, read through their indexes.

        Reads exactly the entries asked for; one whose state has expired is left out.
        """
        indexes = await self.indexes(flow, status)
        ids = [execution_id for execution_id, _ in await self.newest(indexes, limit, offset=offset, since=since)]
        return await self.summaries(ids)

    async def in_flight(self, count: int = 10_000) -> list[str]:
        """Ids of the executions a worker holds right now: the ready stream's pending entries.

        No index is written when a worker picks an execution up (that would cost every execution
        a write); the consumer group's pending list already is one, as long as workers run.
        """
        pending = await self.redis.xpending_range(self.keys.ready, GROUP, "-", "+", count)
        if not pending:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry in pending:
            pipe.xrange(self.keys.ready, entry["message_id"], entry["message_id"])
        ids = []
        for found in await pipe.execute():
            for _, fields in found:
                execution_id = fields.get(b"e") or fields.get("e")
                if execution_id:
                    ids.append(_text(execution_id))
        return ids

    async def summaries(self, ids: list[str]) -> list[dict[str, Any]]:
        """The meta of each execution (fields m and s merged, or the compact form's), leaving out expired ones."""
        return [meta for _, meta in await self._summaries(ids) if meta is not None]

    async def _summaries(self, ids: list[str]) -> list[tuple[list[Any], dict[str, Any] | None]]:
        """The raw :data:`SUMMARY_FIELDS` of each execution and their decoded meta (None when expired)."""
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for execution_id in ids:
            pipe.hmget(self.keys.execution(execution_id), list(SUMMARY_FIELDS))
        replies = await pipe.execute()
        return [(raw, decode_summary(execution_id, raw)) for execution_id, raw in zip(ids, replies, strict=True)]

    async def dead_letters(self, count: int = 1000) -> list[dict[str, str]]:
        entries = await self.redis.xrange(self.keys.dead, count=count)
        return [
            {"entry": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}}
            for entry_id, fields in entries
        ]

    async def remove_dead_letters(self, execution_id: str, entries: list[str] | None = None) -> int:
        """Delete an execution's dead letters: the given stream ``entries``, else found by reading the stream."""
        if entries is None:
            entries = [entry["entry"] for entry in await self.dead_letters(100_000) if entry["e"] == execution_id]
        if entries:
            await self.redis.xdel(self.keys.dead, *entries)
        return len(entries)

    async def stats(self) -> dict[str, Any]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.keys.ready)
        pipe.xpending(self.keys.ready, GROUP)
        pipe.zcard(self.keys.delayed)
        pipe.xlen(self.keys.dead)
        pipe.hgetall(self.keys.counters)
        pipe.xlen(self.keys.events)
        pipe.xrange(self.keys.events, count=1)
        ready_len, pending, delayed, dead, counters, events, first_event = await pipe.execute()
        in_flight = int(pending["pending"]) if pending else 0
        return {
            "ready": int(ready_len) - in_flight,
            "in_flight": in_flight,
            "delayed": int(delayed),
            "dead": int(dead),
            "events": int(events),
            "events_age_seconds": round(entry_age(first_event), 3),
            "counters": {_text(k): int(v) for k, v in counters.items()},
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _delivery(message_id: Any, fields: dict[Any, Any]) -> Delivery:
    fields = {_text(k): _text(v) for k, v in fields.items()}
    return Delivery(_text(message_id), fields.get("e", ""))
