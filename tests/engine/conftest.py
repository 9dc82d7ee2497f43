"""Fixtures for the engine's analytics tests: a sink factory over a data folder, the events stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from flowchat.events import Events
from flowchat.keys import Keys
from flowchat.sink import Sink, SinkSettings


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def start_sink(redis: Redis, data_dir: Path) -> AsyncIterator[Callable[..., Sink]]:
    started: list[tuple[Sink, asyncio.Task[None]]] = []

    def start(sink_class: type[Sink] = Sink, **options: Any) -> Sink:
        settings = SinkSettings(data_dir, **{"flush": 0.05, "lease_ttl": 1.0, **options})
        sink = sink_class(redis, Keys(), settings)
        started.append((sink, asyncio.create_task(sink.run())))
        return sink

    yield start
    for sink, task in started:
        sink.stop()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def events(redis: Redis) -> Events:
    """The events stream of the queue ``fc``, its group created."""
    stream = Events(redis, Keys("fc"))
    await stream.setup()
    return stream
