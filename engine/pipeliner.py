"""Automatic pipelining: Redis commands issued in the same event-loop turn share one round trip.

Many executions run concurrently in one worker; each checkpoint is one command.
Rather than one round trip per command, :class:`Pipeliner` queues commands and
sends them together as soon as the loop is free, resolving each caller's future
with its own reply (or error). At most ``max_in_flight`` batches are on the wire
at once: commands issued while they are out wait and leave together in the next
batch, so under load batches grow instead of round trips multiplying (every
write and read costs CPU in the kernel on both sides, whatever its size).

On Redis Cluster the batch is split by the node that owns each command's first key
(one hash tag per queue keeps a queue's commands on one node), sent to those nodes
at once, and any command answered with a redirection (``MOVED``/``ASK`` while slots
migrate) is sent again through the cluster client, which follows it and refreshes
its slot map.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, ClusterDownError, MovedError, ResponseError, TryAgainError

_REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)
_SHARED: weakref.WeakKeyDictionary[Any, Pipeliner] = weakref.WeakKeyDictionary()


class Pipeliner:
    """Send commands issued close together in one pipeline (not a transaction)."""

    def __init__(self, redis: Redis, max_batch: int = 1000, deadline: float = 30.0, max_in_flight: int = 2) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self.deadline = deadline
        self.max_in_flight = max_in_flight
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresh = False

    @classmethod
    def shared(cls, redis: Redis) -> Pipeliner:
        """The one pipeliner of this client, so the queue's and the services' commands issued in
        the same loop turn share one round trip rather than one per service."""
        found = _SHARED.get(redis)
        if found is None:
            found = _SHARED[redis] = cls(redis)
        return found

    def execute(self, *command: Any) -> asyncio.Future[Any]:
        """Queue one command; await the returned future for its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((command, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._pending and self._in_flight < self.max_in_flight:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self.round_trip([command for command, _ in batch])
        except (TypeError, ValueError) as exc:  # a command that cannot be packed: nothing was sent
            await self._send_without_culprits(batch, exc)
            return
        except Exception as exc:  # connection-level failure: every caller gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _send_without_culprits(
        self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]], exc: Exception
    ) -> None:
        """Fail only the commands that cannot be packed (bad bytes from one caller) and send the rest."""
        good: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        for command, future in batch:
            try:
                hiredis.pack_command(command)
            except (TypeError, ValueError) as error:
                if not future.done():
                    future.set_exception(error)
            else:
                good.append((command, future))
        if len(good) == len(batch):  # the packing was not the cause: every caller gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        elif good:
            await self._send(good)

    async def round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` now, in one write (packed by hiredis); replies are raw, errors returned in place."""
        if isinstance(self.redis, RedisCluster):
            return await self._cluster_round_trip(self.redis, commands)
        pool = self.redis.connection_pool
        connection = await pool.get_connection()
        try:
            return await self._exchange(connection, commands)
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    async def _exchange(self, connection: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            async with asyncio.timeout(self.deadline):  # one deadline per batch, not a timer per reply
                await connection.send_packed_command(b"".join(hiredis.pack_command(command) for command in commands))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await connection.read_response())
                    except ResponseError as error:
                        replies.append(error)
            return replies
        except BaseException:
            await connection.disconnect()
            raise

    async def _cluster_round_trip(
        self, cluster: RedisCluster, commands: list[tuple[Any, ...]], redirects: int = 3
    ) -> list[Any]:
        """One write per node, all nodes at once; redirected commands are sent again after a slot-map refresh."""
        if self._refresh:
            self._refresh = False
            await cluster.nodes_manager.initialize()
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for index, command in enumerate(commands):
            node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(command_key(command)))
            by_node.setdefault(node.name, (node, []))[1].append(index)
        replies: list[Any] = [None] * len(commands)
        groups = list(by_node.values())
        answers = await asyncio.gather(*(self._node_trip(node, [commands[i] for i in idx]) for node, idx in groups))
        for (_, indexes), node_replies in zip(groups, answers, strict=True):
            for index, reply in zip(indexes, node_replies, strict=True):
                replies[index] = reply
        moved = [index for index, reply in enumerate(replies) if isinstance(reply, _REDIRECTS)]
        if moved and redirects > 0:
            # a redirected command was not run: refresh the slot map and send just those again
            await cluster.nodes_manager.initialize()
            again = await self._cluster_round_trip(cluster, [commands[i] for i in moved], redirects - 1)
            for index, reply in zip(moved, again, strict=True):
                replies[index] = reply
        return replies

    async def _node_trip(self, node: ClusterNode, commands: list[tuple[Any, ...]]) -> list[Any]:
        connection = node.acquire_connection()
        try:
            return await self._exchange(connection, commands)
        except BaseException:
            self._refresh = True  # a node that went away: ask the cluster for its topology next time
            raise
        finally:
            node.release(connection)


def command_key(command: tuple[Any, ...]) -> Any:
    """The first key of a raw command (what picks its Cluster node): EVAL/EVALSHA's first KEYS, XREADGROUP's stream."""
    name = str(command[0]).upper()
    if name in ("EVAL", "EVALSHA") and int(command[2]) > 0:
        return command[3]
    if name in ("XREAD", "XREADGROUP"):
        upper = [str(part).upper() for part in command]
        return command[upper.index("STREAMS") + 1]
    return command[1]
