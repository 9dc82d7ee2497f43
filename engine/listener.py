"""The ingress socket, bounded: half-open or idle connections cannot exhaust the daemon's descriptors.

aiohttp has no timeout for a request whose headers never finish arriving, so
300 idle connections can take every descriptor of a process (and the flow
watcher, Redis and log files then fail with EMFILE). Here:

- a connection not handling a request (headers still arriving, or idle between
  keep-alive requests) for ``header_timeout`` seconds is closed;
- at most ``max_connections`` are open at once (never more than half the
  process's descriptor limit); a connection over the limit is closed at once;
- accept errors (EMFILE included) are retried by asyncio's own accept loop and
  never stop the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("flowchat.listener")


def connection_limit(wanted: int) -> int:
    """``wanted``, but at most half the descriptor limit: the other half is for Redis, files and logs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, soft // 2))


class BoundedSite(web.TCPSite):
    """A TCPSite that closes stalled connections and caps how many are open."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, header_timeout: float, max_connections: int
    ) -> None:
        super().__init__(runner, host, port)
        self.header_timeout = header_timeout
        self.max_connections = connection_limit(max_connections)
        # RequestHandler has __slots__ without weak references: plain containers, pruned by the sweeper
        self._open: set[RequestHandler] = set()
        self._idle_since: dict[RequestHandler, tuple[float, int]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.closed_stalled = 0
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._accept(server()),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="connection sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await super().stop()

    def _accept(self, protocol: RequestHandler) -> Any:
        if len(self._open) >= self.max_connections:
            self.refused += 1
            return _Refused()
        self._open.add(protocol)
        return protocol

    async def _sweep(self) -> None:
        interval = max(0.05, self.header_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for protocol in list(self._open):
                transport = protocol.transport
                if transport is None or transport.is_closing():
                    self._forget(protocol)
                    continue
                if getattr(protocol, "_current_request", None) is not None:
                    self._idle_since.pop(protocol, None)  # a request is being handled: its own timeouts apply
                    continue
                handled = getattr(protocol, "_request_count", 0)
                since, seen = self._idle_since.get(protocol, (now, handled))
                if seen != handled:  # answered a request since the last look: idle from now
                    since = now
                self._idle_since[protocol] = (since, handled)
                if now - since >= self.header_timeout:
                    self.closed_stalled += 1
                    transport.close()
                    self._forget(protocol)

    def _forget(self, protocol: RequestHandler) -> None:
        self._open.discard(protocol)
        self._idle_since.pop(protocol, None)


class _Refused(asyncio.Protocol):
    """Closes a connection over the limit as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
