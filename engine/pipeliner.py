"""Automatic pipelining: Redis commands issued in the same event-loop turn share one round trip.

Many executions run concurrently in one worker; each checkpoint is one command.
Rather than one round trip per command, :class:`Pipeliner` queues commands and
sends them together as soon as the loop is free, resolving each caller's future
with its own reply (or error).
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ResponseError


class Pipeliner:
    """Send commands issued close together in one pipeline (not a transaction)."""

    def __init__(self, redis: Redis, max_batch: int = 1000, deadline: float = 30.0) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self.deadline = deadline
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

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
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self.round_trip([command for command, _ in batch])
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

    async def round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` now, in one write (packed by hiredis); replies are raw, errors returned in place."""
        pool = self.redis.connection_pool
        connection = await pool.get_connection()
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
        finally:
            await pool.release(connection)
