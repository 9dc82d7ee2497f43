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
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from flowchat import capacity
from flowchat.access_log import access_log
from flowchat.catalog import Catalog
from flowchat.connections import describe, open_queue, open_redis, queue_keys, redis_client, retention
from flowchat.ingress import CATALOG_KEY, METRICS_KEY, QUEUE_KEY, create_app, healthz, metrics_endpoint, readyz
from flowchat.listener import BoundedSite
from flowchat.logs import current_log_format
from flowchat.metrics import Metrics
from flowchat.mover import DelayedMover
from flowchat.queue import Queue
from flowchat.registry import load_registry
from flowchat.scheduler import Scheduler
from flowchat.secrets import flow_secrets, unset_secret_warnings
from flowchat.services import Services, open_services
from flowchat.settings import Settings
from flowchat.startup import eviction_warning, port_taken, unset_webhook_secrets
from flowchat.twilio_webhooks import TwilioWebhooks, twilio_mode
from flowchat.watchdog import LoopWatchdog
from flowchat.worker import Worker, WorkerSettings

log = logging.getLogger("flowchat.daemon")
YOUNG_GC_THRESHOLD = 10_000
__all__ = ["Runtime", "operator_queue", "redis_client", "run", "runtime", "serve", "work"]


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run a long-lived process's ``main`` (serve, worker, sink) on uvloop where it is installed.

    uvloop's event loop does the same work as asyncio's for less CPU: measured on the CRM flow,
    ~10-20% less worker CPU per execution (futures, callbacks and socket I/O are most of the
    difference). Where it is not installed (Windows), asyncio's own loop runs.

    The cyclic garbage collector's youngest generation is collected every 10,000 net allocations
    instead of 700: an execution allocates and frees thousands of dicts, and at 700 a CRM worker
    ran 755 collections per 6,000 executions (12.6 µs of CPU each execution), at 10,000 four
    (0.4 µs). Reference cycles are still collected, a little later.
    """
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


@dataclass
class Runtime:
    queue: Queue
    catalog: Catalog
    services: Services
    metrics: Metrics
    settings: Settings


@contextlib.asynccontextmanager
async def runtime(flows: Path, plugins: Path | None = None, settings: Settings | None = None) -> AsyncIterator[Runtime]:
    """Redis, registry, catalog and services, set up and torn down in order."""
    settings = settings or Settings.from_env()
    async with open_redis(settings) as redis:
        registry = load_registry(plugins if plugins is not None else settings.plugins)
        for error in registry.errors:
            log.error("[%s] %s", error.code, error.message)
        catalog = Catalog(flows, registry)
        catalog.reload()
        gc.freeze()  # start-up objects never need collecting: shorter GC pauses under load
        log.info(
            "serving %d flow(s) from %s: %s", len(catalog.flows), flows, ", ".join(sorted(catalog.flows)) or "none"
        )
        log.info(_startup_line(settings, redis, flows, len(catalog.flows)))
        for line in unset_webhook_secrets(catalog, settings):
            log.warning("%s", line)
        eviction = await eviction_warning(redis)
        if eviction:
            log.warning("%s", eviction)
        keys = queue_keys(settings)
        async with open_services(settings, redis=redis, keys=keys) as services:
            for warning in unset_secret_warnings(flow_secrets(catalog.flows.values()), services.secrets):
                log.warning("%s", warning)
            catalog.secrets = services.secrets  # flows reloaded from now on are checked as they load
            yield Runtime(Queue(redis, keys, retention=retention(settings)), catalog, services, Metrics(), settings)


def _startup_line(settings: Settings, redis: object, flows: Path, count: int) -> str:
    """Which Redis (host and mode, never the password), data dir, flows and send mode."""
    send = "twilio" if settings.twilio_account_sid and settings.twilio_auth_token else "outbox"
    return (
        f"redis {describe(settings, redis)}; queue {settings.queue}; data dir {settings.data_dir.resolve()}; "
        f"{count} flow(s) from {flows.resolve()}; send mode {send}"
    )


def _stop_on_signals(stop: asyncio.Event, grace: float, catalog: Catalog | None = None) -> None:
    """SIGTERM/SIGINT drain and stop; SIGHUP (systemd ``ExecReload``) reloads the flows folder now."""
    loop = asyncio.get_running_loop()
    if catalog is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload, catalog)

    def stopping(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s received: taking no new work; draining in-flight executions for up to %.0fs", sig.name, grace)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping, sig)


def _reload(catalog: Catalog) -> None:
    changed = catalog.reload()
    log.info(
        "SIGHUP received: flows reloaded from %s (%s); %d flow(s)",
        catalog.folder,
        "changed" if changed else "no change",
        len(catalog.flows),
    )


def _drained(started: float, status: int) -> int:
    log.info("drain finished in %.1fs; exiting with status %d", time.monotonic() - started, status)
    return status


async def _listen(app: web.Application, host: str, port: int, settings: Settings) -> web.AppRunner:
    """Start serving ``app``; a taken port is a :class:`StartupError` (one line, exit 1), not a traceback.

    Stalled connections are closed after ``settings.header_timeout`` and at most
    ``settings.max_connections`` are open (see flowchat.listener).
    """
    # flowchat.access logs each request instead of aiohttp's access log
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=settings.header_timeout)
    await runner.setup()
    site = BoundedSite(
        runner, host, port, header_timeout=settings.header_timeout, max_connections=settings.max_connections
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise port_taken(host, port, exc) from None
    log.info("listening on http://%s:%d", host, port)
    return runner


def health_app(rt: Runtime) -> web.Application:
    """``/healthz``, ``/readyz`` and ``/metrics`` alone: what ``flowchat worker --port N`` serves."""
    app = web.Application(middlewares=[access_log])
    app[QUEUE_KEY], app[CATALOG_KEY], app[METRICS_KEY] = rt.queue, rt.catalog, rt.metrics
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


async def serve(
    flows: Path,
    host: str,
    port: int,
    concurrency: int,
    workers: bool,
    plugins: Path | None = None,
    strict: bool = False,
) -> int:
    """Ingress, workers, scheduler and mover until SIGTERM/SIGINT; exit status 0, or 1 if a part died.

    A broken flow file is logged and its routes answer 404 while the valid flows serve;
    with ``strict`` the daemon refuses to start instead (exit status 1).
    """
    stop = asyncio.Event()
    async with runtime(flows, plugins) as rt:
        _stop_on_signals(stop, rt.settings.grace, rt.catalog)
        if strict and rt.catalog.problems:
            for problems in rt.catalog.problems.values():
                for problem in problems:
                    print(problem, file=sys.stderr)
            print(f"flowchat: --strict: not starting, {len(rt.catalog.problems)} broken flow file(s)", flush=True)
            return 1
        twilio = TwilioWebhooks(rt.settings, rt.services)
        app = create_app(rt.queue, rt.catalog, rt.metrics, twilio, settings=rt.settings)
        runner = await _listen(app, host, port, rt.settings)
        print(f"flowchat: listening on http://{host}:{port} with {len(rt.catalog.flows)} flow(s)", flush=True)
        print(f"flowchat: {twilio_mode(rt.settings)}", flush=True)
        parts = _Parts(stop)
        parts.start(DelayedMover(rt.queue).run(), "delayed-work mover")
        parts.start(LoopWatchdog(rt.metrics, rt.settings.stall_threshold).run(), "loop watchdog")
        parts.start(Scheduler(rt.queue, rt.catalog).run(), "scheduler")
        parts.start(rt.catalog.watch(), "flow watcher")
        parts.start(capacity.watch(rt.queue, rt.metrics), "capacity watch")
        worker = _worker(rt, concurrency) if workers else None
        worker_task = parts.start(worker.run(), "worker") if worker else None
        sink = SinkProcess() if rt.settings.analytics else None
        sink_task = parts.start(sink.run(), "analytics sink") if sink else None
        await stop.wait()
        draining = time.monotonic()
        await runner.cleanup()
        if worker and worker_task:
            worker.stop()
            await asyncio.gather(worker_task, return_exceptions=True)
        if sink and sink_task:
            await sink.stop(rt.settings.grace)
            await asyncio.gather(sink_task, return_exceptions=True)
        return _drained(draining, await parts.stop())


class SinkProcess:
    """``flowchat sink`` as a child of serve, restarted if it dies, stopped with serve.

    Writing Parquet and publishing the views costs CPU in bursts; in its own process that
    never holds the serving process's event loop or GIL (accept-to-send latency), and the
    operating system can run it on another core. The child competes for the sink lease like
    any other ``flowchat sink``, and stops by itself if serve goes away without stopping it.
    """

    def __init__(self, restart_after: float = 1.0, ceiling: float = 30.0) -> None:
        self.restart_after = restart_after
        self.ceiling = ceiling
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()

    def command(self) -> list[str]:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        options = ["--log-level", str(level), "--log-format", current_log_format()]
        return [sys.executable, "-m", "flowchat.cli", *options, "sink", "--parent-pid", str(os.getpid())]

    async def run(self) -> None:
        delay = self.restart_after
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.process = await asyncio.create_subprocess_exec(*self.command(), stdin=asyncio.subprocess.DEVNULL)
            except OSError as exc:  # no process slot or file descriptor left: serving goes on, the sink waits
                ended = f"could not start ({type(exc).__name__}: {exc})"
            else:
                if self._stopping.is_set():
                    self.process.terminate()  # stop() came while it was starting, and found nothing to stop
                ended = f"exited with status {await self.process.wait()}"
            if self._stopping.is_set():
                return
            delay = self.restart_after if time.monotonic() - started > self.ceiling else min(delay * 2, self.ceiling)
            log.warning("the analytics sink %s; starting it again in %.0fs", ended, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def stop(self, grace: float) -> None:
        """SIGTERM (the sink writes what it has read, then exits), then SIGKILL after ``grace`` seconds."""
        self._stopping.set()
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), max(grace, 1.0))
        except TimeoutError:
            log.warning("the analytics sink did not stop within %.0fs; killing it", grace)
            process.kill()
            await process.wait()


async def work(
    flows: Path, concurrency: int, plugins: Path | None = None, *, host: str = "127.0.0.1", port: int | None = None
) -> int:
    """Workers and the mover until SIGTERM/SIGINT; exit status 0, or 1 if a part died.

    With ``port`` it also serves ``/healthz``, ``/readyz`` and ``/metrics`` there.
    """
    stop = asyncio.Event()
    async with runtime(flows, plugins) as rt:
        _stop_on_signals(stop, rt.settings.grace, rt.catalog)
        runner = await _listen(health_app(rt), host, port, rt.settings) if port is not None else None
        parts = _Parts(stop)
        parts.start(DelayedMover(rt.queue).run(), "delayed-work mover")
        parts.start(LoopWatchdog(rt.metrics, rt.settings.stall_threshold).run(), "loop watchdog")
        parts.start(rt.catalog.watch(), "flow watcher")
        parts.start(capacity.watch(rt.queue, rt.metrics), "capacity watch")
        worker = _worker(rt, concurrency)
        worker_task = parts.start(worker.run(), "worker")
        print(f"flowchat: worker {worker.settings.consumer} running {len(rt.catalog.flows)} flow(s)", flush=True)
        await stop.wait()
        draining = time.monotonic()
        worker.stop()
        await asyncio.gather(worker_task, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        return _drained(draining, await parts.stop())


def _worker(rt: Runtime, concurrency: int) -> Worker:
    return Worker(
        rt.queue,
        rt.catalog,
        rt.services,
        WorkerSettings.from_settings(rt.settings, concurrency=concurrency),
        rt.metrics,
    )


class _Parts:
    """The daemon's long-running tasks. One that dies stops the daemon, loudly, with status 1."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop_event = stop
        self.tasks: list[asyncio.Task[None]] = []
        self.failed = False

    def start(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._ended)
        self.tasks.append(task)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stop_event.is_set():
            return
        error = task.exception()
        log.critical(
            "the %s stopped unexpectedly (%r); shutting down so a supervisor can restart us", task.get_name(), error
        )
        self.failed = True
        self.stop_event.set()

    async def stop(self) -> int:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        return 1 if self.failed else 0


@contextlib.asynccontextmanager
async def operator_queue(settings: Settings | None = None) -> AsyncIterator[Queue]:
    """The queue for operator commands: FLOWCHAT_REDIS_URL, else the embedded server's data."""
    async with open_queue(settings or Settings.from_env()) as queue:
        yield queue
