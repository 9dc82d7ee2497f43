"""A worker process for benchmarks: the real runtime and Worker, plus a count of Redis round trips.

    python -m bench.worker_proc REDIS_URL FLOWS CONCURRENCY [QUEUE]

Redis, registry, catalog and services come from ``flowchat.daemon.runtime`` exactly as
``flowchat worker`` sets them up (settings from the environment, with this Redis and
queue name). Every network write of
a command or a pipeline is one round trip; the count, the CPU time spent after start-up
and the process's peak RSS are printed as JSON on SIGTERM. Modules a long-running worker
imports on its first send are imported before the clock starts. With ``BENCH_WAIT_GO``
set the worker prints ``ready`` and starts reading on SIGUSR1, so several start at once.
With ``BENCH_PROFILE=FILE`` the run is profiled (cProfile, from start to SIGTERM) into FILE;
with ``BENCH_ASYNCIO`` set it runs on asyncio's own loop instead of uvloop (sampling profilers
such as py-spy then see whole coroutine stacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import json
import os
import resource
import signal
import sys
from pathlib import Path

from redis.asyncio.connection import AbstractConnection

from flowchat.daemon import run, runtime
from flowchat.mover import DelayedMover
from flowchat.pipeliner import Pipeliner
from flowchat.settings import Settings
from flowchat.worker import Worker, WorkerSettings

ROUND_TRIPS = {"count": 0}
_send = AbstractConnection.send_packed_command


async def _counting_send(self, command, check_health=True):  # type: ignore[no-untyped-def]
    ROUND_TRIPS["count"] += 1
    ROUND_TRIPS["commands"] = ROUND_TRIPS.get("commands", 0) + 1
    ROUND_TRIPS["bytes"] = ROUND_TRIPS.get("bytes", 0) + (
        len(command) if isinstance(command, bytes | bytearray) else sum(map(len, command))
    )
    return await _send(self, command, check_health)


AbstractConnection.send_packed_command = _counting_send  # type: ignore[method-assign]
_write = Pipeliner._write


def _counting_write(self, link, batch):  # type: ignore[no-untyped-def]
    """The auto-pipeline writes on its own connection: each batch written is one round trip."""
    ROUND_TRIPS["count"] += 1
    ROUND_TRIPS["commands"] = ROUND_TRIPS.get("commands", 0) + len(batch)
    return _write(self, link, batch)


Pipeliner._write = _counting_write  # type: ignore[method-assign]


async def main(url: str, flows: str, concurrency: int, queue_name: str = "fc") -> int:
    stop, go = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)
    with contextlib.suppress(ImportError):
        import twilio.rest  # noqa: F401  (imported on the first send otherwise)
    settings = Settings.from_env({**os.environ, "FLOWCHAT_REDIS_URL": url, "FLOWCHAT_QUEUE": queue_name})
    async with runtime(Path(flows), settings=settings) as rt:
        worker_settings = WorkerSettings.from_settings(rt.settings, concurrency=concurrency, block_ms=200)
        worker = Worker(rt.queue, rt.catalog, rt.services, worker_settings, rt.metrics)
        print("ready", flush=True)
        if os.environ.get("BENCH_WAIT_GO"):
            await go.wait()
        ROUND_TRIPS.clear()
        ROUND_TRIPS["count"] = 0
        profiler = cProfile.Profile() if os.environ.get("BENCH_PROFILE") else None
        if profiler is not None:
            profiler.enable()
        at_ready = resource.getrusage(resource.RUSAGE_SELF)
        mover = asyncio.create_task(DelayedMover(rt.queue).run())
        task = asyncio.create_task(worker.run())
        await stop.wait()
        worker.stop()
        await task
        mover.cancel()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.environ["BENCH_PROFILE"])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        trips = ROUND_TRIPS["count"]
    print(
        json.dumps(
            {
                "round_trips": trips,
                "bytes_sent": ROUND_TRIPS.get("bytes", 0),
                "commands": ROUND_TRIPS.get("commands", 0),
                "peak_rss_mb": usage.ru_maxrss / 1024,
                "cpu_seconds": usage.ru_utime + usage.ru_stime - at_ready.ru_utime - at_ready.ru_stime,
                "system_cpu_seconds": usage.ru_stime - at_ready.ru_stime,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    coroutine = main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
    asyncio.run(coroutine) if os.environ.get("BENCH_ASYNCIO") else run(coroutine)  # run: `flowchat worker`'s loop
