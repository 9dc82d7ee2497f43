"""The long-running processes: ``flowchat serve`` and ``flowchat worker``.

Both share one runtime: Redis (the configured one, or a private embedded
server), the node registry, the hot-reloading flow catalog and node services.
SIGTERM or SIGINT stops taking work, lets in-flight executions finish for up
to the grace period, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from redis.asyncio import Redis

from engine.catalog import Catalog
from engine.ingress import create_app
from engine.keys import Keys
from engine.metrics import Metrics
from engine.queue import Queue
from engine.redis_server import RedisServer, data_dir
from engine.registry import load_registry
from engine.scheduler import Scheduler
from engine.services import Services, open_services
from engine.worker import DelayedMover, Worker, WorkerSettings

log = logging.getLogger("flowchat.daemon")
REDIS_URL_ENV = "FLOWCHAT_REDIS_URL"


@dataclass
class Runtime:
    queue: Queue
    catalog: Catalog
    services: Services
    metrics: Metrics


def redis_client(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=2, health_check_interval=15)


@contextlib.asynccontextmanager
async def runtime(flows: Path) -> AsyncIterator[Runtime]:
    """Redis, registry, catalog and services, set up and torn down in order."""
    embedded: RedisServer | None = None
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        embedded = RedisServer(data_dir()).start()
        url = embedded.url
        log.info("embedded redis-server with AOF in %s", embedded.data_dir)
    redis = redis_client(url)
    try:
        registry = load_registry()
        for error in registry.errors:
            log.error("[%s] %s", error.code, error.message)
        catalog = Catalog(flows, registry)
        catalog.reload()
        gc.freeze()  # start-up objects never need collecting: shorter GC pauses under load
        log.info(
            "serving %d flow(s) from %s: %s", len(catalog.flows), flows, ", ".join(sorted(catalog.flows)) or "none"
        )
        async with open_services() as services:
            yield Runtime(Queue(redis, Keys(os.environ.get("FLOWCHAT_QUEUE", "fc"))), catalog, services, Metrics())
    finally:
        await redis.aclose()
        if embedded is not None:
            embedded.stop()


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(flows: Path, host: str, port: int, concurrency: int, workers: bool) -> None:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with runtime(flows) as rt:
        runner = web.AppRunner(create_app(rt.queue, rt.catalog, rt.metrics), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info("listening on http://%s:%d", host, port)
        print(f"flowchat: listening on http://{host}:{port} with {len(rt.catalog.flows)} flow(s)", flush=True)
        worker = (
            Worker(rt.queue, rt.catalog, rt.services, WorkerSettings.from_env(concurrency=concurrency), rt.metrics)
            if workers
            else None
        )
        background = [
            asyncio.create_task(DelayedMover(rt.queue).run()),
            asyncio.create_task(Scheduler(rt.queue, rt.catalog).run()),
            asyncio.create_task(rt.catalog.watch()),
        ]
        worker_task = asyncio.create_task(worker.run()) if worker else None
        await stop.wait()
        log.info("stopping: no new requests or work; draining in-flight executions")
        await runner.cleanup()
        if worker and worker_task:
            worker.stop()
            await worker_task
        await _cancel(background)


async def work(flows: Path, concurrency: int) -> None:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with runtime(flows) as rt:
        worker = Worker(rt.queue, rt.catalog, rt.services, WorkerSettings.from_env(concurrency=concurrency), rt.metrics)
        background = [asyncio.create_task(DelayedMover(rt.queue).run()), asyncio.create_task(rt.catalog.watch())]
        worker_task = asyncio.create_task(worker.run())
        print(f"flowchat: worker {worker.settings.consumer} running {len(rt.catalog.flows)} flow(s)", flush=True)
        await stop.wait()
        worker.stop()
        await worker_task
        await _cancel(background)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def operator_queue() -> AsyncIterator[Queue]:
    """The queue for operator commands: FLOWCHAT_REDIS_URL, else the embedded server's data."""
    embedded: RedisServer | None = None
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        embedded = RedisServer(data_dir()).start()
        url = embedded.url
    redis = redis_client(url)
    try:
        queue = Queue(redis, Keys(os.environ.get("FLOWCHAT_QUEUE", "fc")))
        await queue.setup()
        yield queue
    finally:
        await redis.aclose()
        if embedded is not None:
            embedded.stop()
