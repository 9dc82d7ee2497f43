"""A worker process for benchmarks: the real Worker, plus a count of Redis round trips.

Every network write of a command or a pipeline is one round trip; the count and the
process's peak RSS are printed as JSON on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sys
from pathlib import Path

from redis.asyncio.connection import AbstractConnection

from flowchat.catalog import Catalog
from flowchat.connections import open_redis
from flowchat.keys import Keys
from flowchat.mover import DelayedMover
from flowchat.queue import Queue
from flowchat.registry import load_registry
from flowchat.services import open_services
from flowchat.settings import Settings
from flowchat.worker import Worker, WorkerSettings

ROUND_TRIPS = {"count": 0}
_send = AbstractConnection.send_packed_command


async def _counting_send(self, command, check_health=True):  # type: ignore[no-untyped-def]
    ROUND_TRIPS["count"] += 1
    return await _send(self, command, check_health)


AbstractConnection.send_packed_command = _counting_send  # type: ignore[method-assign]


async def main(url: str, flows: str, concurrency: int, queue_name: str = "fc") -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    catalog = Catalog(Path(flows), load_registry(entry_points=False))
    catalog.reload()
    async with open_redis(Settings.from_env({"FLOWCHAT_REDIS_URL": url})) as redis, open_services() as services:
        queue = Queue(redis, Keys(queue_name))
        worker = Worker(queue, catalog, services, WorkerSettings(concurrency=concurrency, block_ms=200))
        mover = asyncio.create_task(DelayedMover(queue).run())
        task = asyncio.create_task(worker.run())
        at_ready = resource.getrusage(resource.RUSAGE_SELF)
        print("ready", flush=True)
        await stop.wait()
        worker.stop()
        await task
        mover.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "round_trips": ROUND_TRIPS["count"],
                "peak_rss_mb": usage.ru_maxrss / 1024,
                "cpu_seconds": usage.ru_utime + usage.ru_stime - at_ready.ru_utime - at_ready.ru_stime,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5]))
