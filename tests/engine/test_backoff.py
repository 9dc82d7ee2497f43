"""flowchat.backoff: pauses double up to a ceiling; losing and regaining Redis is logged once per change."""

import asyncio
import logging

import pytest

from flowchat import backoff
from flowchat.backoff import Backoff, RedisLink


@pytest.fixture
def link(monkeypatch: pytest.MonkeyPatch) -> RedisLink:
    """A fresh link state, so this process's real one (and its counters) is left alone."""
    fresh = RedisLink()
    monkeypatch.setattr(backoff, "REDIS", fresh)
    return fresh


async def test_pauses_double_up_to_the_ceiling_and_reset_starts_over(link):
    pause = Backoff(first=0.001, ceiling=0.004)
    seen = []
    for _ in range(4):
        await pause.wait("refused")
        seen.append(pause.current)
    assert seen == [0.002, 0.004, 0.004, 0.004]
    pause.reset()
    assert pause.current == 0.001


async def test_many_loops_losing_redis_log_it_once_and_once_when_it_is_back(link, caplog):
    caplog.set_level(logging.DEBUG, logger="flowchat.backoff")
    readers = [Backoff(first=0.001, ceiling=0.002) for _ in range(3)]

    async def fail_twice(reader: Backoff) -> None:
        await reader.wait("connection refused")
        await reader.wait("connection refused")

    await asyncio.gather(*(fail_twice(reader) for reader in readers))
    for reader in readers:
        reader.reset()

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("redis unreachable: connection refused")
    assert warnings[1].startswith("redis reachable again after")
    assert (link.up, link.errors, link.reconnects) == (True, 6, 1)
