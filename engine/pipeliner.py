"""Automatic pipelining: Redis commands issued in the same event-loop turn share one round trip.

Many executions run concurrently in one worker; each checkpoint is one command.
Rather than one round trip per command, :class:`Pipeliner` queues commands and
sends them together as soon as the loop is free, resolving each caller's future
with its own reply (or error). At most ``max_in_flight`` batches are on the wire
at once: commands issued while they are out wait and leave together in the next
batch, so under load batches grow instead of round trips multiplying (every
write and read costs CPU in the kernel on both sides, whatever its size).

On one server (or a Sentinel-managed primary) the batches travel on one connection
the pipeliner keeps (:class:`_Link`): a batch is written the moment it forms, and one
reader parses whatever arrives with hiredis and resolves the callers' futures in
order — no task, pool checkout or per-reply read per batch. Redis answers a
connection's commands in the order it received them, so batches can follow each
other on the wire. Commands that block (``XREADGROUP … BLOCK``) must not go this way:
:meth:`Pipeliner.round_trip` sends them on a connection of their own.

On Redis Cluster the batch is split by the node that owns each command's first key
(one hash tag per queue keeps a queue's commands on one node), sent to those nodes
at once, and any command answered with a redirection (``MOVED``/``ASK`` while slots
migrate) is sent again through the cluster client, which follows it and refreshes
its slot map.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    InvalidResponse,
    MovedError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)
_SHARED: weakref.WeakKeyDictionary[Any, Pipeliner] = weakref.WeakKeyDictionary()


Pending = list[tuple[tuple[Any, ...], "asyncio.Future[Any]"]]


class Pipeliner:
    """Send commands issued close together in one pipeline (not a transaction)."""

    def __init__(self, redis: Redis, max_batch: int = 1000, deadline: float = 30.0, max_in_flight: int = 2) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self.deadline = deadline
        self.max_in_flight = max_in_flight
        self._pending: Pending = []
        self._flush_scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresh = False
        self._link: _Link | None = None
        self._connecting = False

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
        if isinstance(self.redis, RedisCluster):
            self._flush_in_tasks()
            return
        link = self._link
        if link is None or not link.usable:
            if link is not None:
                link.close(RedisConnectionError("the connection to Redis was closed"))
            self._link = None
            self._connect()
            return
        while self._pending and link.in_flight < self.max_in_flight:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self._write(link, batch)

    def _write(self, link: _Link, batch: Pending) -> None:
        """Put one batch on the wire (the seam where round trips are counted)."""
        try:
            packed = b"".join([hiredis.pack_command(command) for command, _ in batch])
        except (TypeError, ValueError) as exc:  # a command that cannot be packed: nothing was sent
            good = _without_culprits(batch, exc)
            if good:
                self._write(link, good)
            return
        link.send(packed, [future for _, future in batch])

    def _connect(self) -> None:
        """Open the pipeliner's connection in the background; the pending commands leave once it is up."""
        if self._connecting:
            return
        self._connecting = True
        task = asyncio.get_running_loop().create_task(self._open_link())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_link(self) -> None:
        try:
            self._link = await _Link.open(self.redis, self.deadline, self._batch_done)
        except Exception as exc:  # Redis unreachable: every waiting caller gets it, the next command tries again
            pending, self._pending = self._pending, []
            _fail(pending, exc)
            return
        finally:
            self._connecting = False
        self._flush()

    def _batch_done(self) -> None:
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    # --- Redis Cluster: a task per batch, split by node ---------------------------------

    def _flush_in_tasks(self) -> None:
        while self._pending and self._in_flight < self.max_in_flight:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        self._batch_done()

    async def _send(self, batch: Pending) -> None:
        try:
            replies = await self.round_trip([command for command, _ in batch])
        except (TypeError, ValueError) as exc:  # a command that cannot be packed: nothing was sent
            good = _without_culprits(batch, exc)
            if good:
                await self._send(good)
            return
        except Exception as exc:  # connection-level failure: every caller gets it
            _fail(batch, exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            _resolve(future, reply)

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


class _Link:
    """The pipeliner's own connection: batches go out as written; one reader matches replies to callers in order."""

    def __init__(self, redis: Redis, connection: Any, deadline: float, on_batch_done: Callable[[], None]) -> None:
        self.redis = redis
        self.connection = connection
        self.deadline = deadline
        self.on_batch_done = on_batch_done
        self.closed = False
        self.in_flight = 0
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._batch_ends: deque[tuple[int, asyncio.TimerHandle]] = deque()
        self._sent = 0
        self._answered = 0
        encoder = connection.encoder
        options: dict[str, Any] = {"protocolError": InvalidResponse, "replyError": BaseParser.parse_error}
        if encoder.decode_responses:
            options.update(encoding=encoder.encoding, errors=encoder.encoding_errors)
        self._parser = hiredis.Reader(**options)
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, redis: Redis, deadline: float, on_batch_done: Callable[[], None]) -> _Link:
        """A connection from the client's pool (so URL, auth, TLS, database and Sentinel apply), kept for good."""
        pool = redis.connection_pool
        connection = await pool.get_connection()
        if getattr(connection, "_reader", None) is None or getattr(connection, "_writer", None) is None:
            await pool.release(connection)
            raise ConnectionError("the Redis connection has no stream to pipeline on")
        link = cls(redis, connection, deadline, on_batch_done)
        link._reader = asyncio.get_running_loop().create_task(link._read())
        return link

    @property
    def usable(self) -> bool:
        writer = self.connection._writer
        return not self.closed and writer is not None and not writer.is_closing()

    def send(self, packed: bytes, futures: list[asyncio.Future[Any]]) -> None:
        """Write one packed batch; ``futures`` get its replies, in order."""
        self.connection._writer.write(packed)
        self._waiting.extend(futures)
        self._sent += len(futures)
        timer = asyncio.get_running_loop().call_later(self.deadline, self._expired, self._sent)
        self._batch_ends.append((self._sent, timer))
        self.in_flight += 1

    async def _read(self) -> None:
        stream = self.connection._reader
        parser, waiting = self._parser, self._waiting
        try:
            while True:
                data = await stream.read(65536)
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if isinstance(reply, ReadOnlyError):  # the primary was demoted: find the new one
                        raise RedisConnectionError("Redis is read-only now (a replica after a failover?)")
                    _resolve(waiting.popleft(), reply)
                    self._answered += 1
                    if self._batch_ends and self._batch_ends[0][0] == self._answered:
                        self._batch_ends.popleft()[1].cancel()
                        self.in_flight -= 1
                        self.on_batch_done()
        except asyncio.CancelledError:
            self.close(RedisConnectionError("the pipeliner stopped"))
            raise
        except Exception as exc:
            self.close(exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(str(exc)))

    def _expired(self, batch_end: int) -> None:
        if self._answered < batch_end and not self.closed:
            self.close(RedisTimeoutError(f"Redis did not answer within {self.deadline:g}s"))

    def close(self, error: Exception) -> None:
        """The connection is done for: every caller still waiting gets ``error``; the next batch opens a new one."""
        if self.closed:
            return
        self.closed = True
        for _, timer in self._batch_ends:
            timer.cancel()
        self._batch_ends.clear()
        waiting, self._waiting = list(self._waiting), deque()
        _fail_futures(waiting, error)
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        task = asyncio.get_running_loop().create_task(self._discard())
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)
        self.on_batch_done()

    async def _discard(self) -> None:
        with contextlib.suppress(Exception):
            await self.connection.disconnect()
        with contextlib.suppress(Exception):
            await self.redis.connection_pool.release(self.connection)


_CLOSING: set[asyncio.Task[None]] = set()


def _resolve(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():
        return
    if isinstance(reply, Exception):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def _fail(batch: Pending, exc: Exception) -> None:
    _fail_futures([future for _, future in batch], exc)


def _fail_futures(futures: list[asyncio.Future[Any]], exc: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
            future.exception()  # a caller that gave up (its task cancelled) is no reason for a warning


def _without_culprits(batch: Pending, exc: Exception) -> Pending:
    """Fail only the commands that cannot be packed (bad bytes from one caller); the rest, to send.

    If no single command is the culprit, every caller gets the error and nothing is left to send.
    """
    good: Pending = []
    for command, future in batch:
        try:
            hiredis.pack_command(command)
        except (TypeError, ValueError) as error:
            if not future.done():
                future.set_exception(error)
        else:
            good.append((command, future))
    if len(good) == len(batch):
        _fail(batch, exc)
        return []
    return good
