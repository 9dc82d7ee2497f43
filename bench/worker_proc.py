"""A worker process for benchmarks: the real runtime and Worker, plus a count of Redis round trips.

    python -m bench.worker_proc REDIS_URL FLOWS CONCURRENCY [QUEUE]

Redis, registry, catalog and services come from ``flowchat.daemon.runtime`` exactly as
``flowchat worker`` sets them up (settings from the environment, with this Redis and
queue name). Every network write of
a command or a pipeline is one round trip; the count, the CPU time spent after start-up
and the process's peak RSS are printed as JSON on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from pathlib import Path

from redis.asyncio.connection import AbstractConnection

from flowchat.daemon import runtime
from flowchat.mover import DelayedMover
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
    settings = Settings.from_env({**os.environ, "FLOWCHAT_REDIS_URL": url, "FLOWCHAT_QUEUE": queue_name})
    async with runtime(Path(flows), settings=settings) as rt:
        worker_settings = WorkerSettings.from_settings(rt.settings, concurrency=concurrency, block_ms=200)
        worker = Worker(rt.queue, rt.catalog, rt.services, worker_settings, rt.metrics)
        mover = asyncio.create_task(DelayedMover(rt.queue).run())
        task = asyncio.create_task(worker.run())
        ROUND_TRIPS["count"] = 0
        at_ready = resource.getrusage(resource.RUSAGE_SELF)
        print("ready", flush=True)
        await stop.wait()
        worker.stop()
        await task
        mover.cancel()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        trips = ROUND_TRIPS["count"]
    print(
        json.dumps(
            {
                "round_trips": trips,
                "peak_rss_mb": usage.ru_maxrss / 1024,
                "cpu_seconds": usage.ru_utime + usage.ru_stime - at_ready.ru_utime - at_ready.ru_stime,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5]))
