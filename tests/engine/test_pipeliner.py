"""flowchat.pipeliner: batches on the pipeliner's own connection, and what happens when that connection fails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flowchat.pipeliner import Pipeliner
from flowchat.redis_server import RedisServer, free_port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    own = RedisServer(tmp_path / "pipeliner-redis", port=free_port()).start()
    yield own
    own.stop(force=True)


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(server.url)
    yield redis
    await redis.aclose()


async def test_commands_of_one_loop_turn_leave_in_one_write_and_answer_in_order(client: Redis) -> None:
    pipeliner = Pipeliner(client)
    writes: list[int] = []
    written = pipeliner._write
    pipeliner._write = lambda link, batch: (writes.append(len(batch)), written(link, batch))[1]  # type: ignore[method-assign]

    replies = await asyncio.gather(*(pipeliner.execute("INCR", "n") for _ in range(50)))

    assert replies == list(range(1, 51))
    assert writes == [50]
    missing, error = await asyncio.gather(pipeliner.execute("GET", "nothing"), pipeliner.execute("HGET", "n", "x"),
                                          return_exceptions=True)  # fmt: skip
    assert missing is None and isinstance(error, ResponseError) and "WRONGTYPE" in str(error)


async def test_a_batch_unanswered_past_the_deadline_fails_and_the_next_gets_a_new_connection(
    server: RedisServer, client: Redis
) -> None:
    pipeliner = Pipeliner(client, deadline=0.3)
    assert await pipeliner.execute("SET", "k", "1") == b"OK"
    admin = Redis(port=server.port)
    await admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
    started = time.monotonic()
    with pytest.raises(RedisTimeoutError):
        await pipeliner.execute("SET", "k", "2")
    assert time.monotonic() - started < 1.2  # the deadline, not the pause, ended it
    await admin.execute_command("CLIENT", "UNPAUSE")
    await admin.aclose()

    assert await pipeliner.execute("SET", "k", "3") == b"OK"
    assert await client.get("k") in (b"2", b"3")


async def test_a_restarted_redis_costs_the_commands_in_flight_then_it_goes_on(
    server: RedisServer, client: Redis
) -> None:
    pipeliner = Pipeliner(client)
    assert await pipeliner.execute("PING") == b"PONG"
    server.stop()
    with pytest.raises(RedisConnectionError):
        await pipeliner.execute("PING")
    server.start()

    assert await pipeliner.execute("SET", "after", "restart") == b"OK"


async def test_a_primary_turned_replica_is_left_for_a_new_connection(server: RedisServer, client: Redis) -> None:
    """READONLY (a failover demoted the primary) closes the connection, as redis-py's Sentinel client does."""
    pipeliner = Pipeliner(client)
    assert await pipeliner.execute("SET", "k", "1") == b"OK"
    link = pipeliner._link
    admin = Redis(port=server.port)
    await admin.execute_command("REPLICAOF", "127.0.0.1", free_port())  # a primary that is not there
    try:
        with pytest.raises(RedisConnectionError):
            await pipeliner.execute("SET", "k", "2")
        assert link is not None and link.closed
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await admin.aclose()

    assert await pipeliner.execute("SET", "k", "3") == b"OK"
    assert pipeliner._link is not link
