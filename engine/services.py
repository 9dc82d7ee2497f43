"""The services a runtime hands to nodes (nodes never build clients themselves).

``ctx.services.http`` is the process's shared aiohttp session, always there.
Other services come from installed packages through the entry point group
``flowchat.services``::

    [project.entry-points."flowchat.services"]
    contacts = "my_package.contacts:open_contacts"

A factory is ``async def factory(settings) -> object`` (or ``async def
factory(settings, services) -> object`` when it needs the runtime's Redis
client, ``services.redis`` and ``services.keys``, or a service started before
it). Each process (``flowchat serve``, ``worker``, ``run``, and
``flowchat.testing``) starts the services once, and closes them on exit: the
object's ``async aclose()`` or ``close()`` is called if it has one. Nodes reach
a service as ``ctx.services.get("contacts")`` and declare the ones they need
(``services = ("contacts",)``) so a flow that uses them is refused at load time
where the service is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiohttp

from flowchat.errors import NodeError
from flowchat.logs import add_secret_values
from flowchat.secrets import Secrets
from flowchat.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from flowchat.keys import Keys

SERVICES_GROUP = "flowchat.services"
log = logging.getLogger("flowchat.services")

Factory = Callable[..., Any]


class ServiceMissing(NodeError, KeyError):
    """``services.get(name)`` of a service this runtime does not have (a KeyError too, for callers probing)."""

    code = "service-missing"

    __str__ = NodeError.__str__


class Services:
    """Shared clients and helpers for nodes: ``ctx.services.http``, ``ctx.services.get(name)``.

    ``redis`` and ``keys`` are the runtime's Redis client and key names (None where the
    process has no Redis, such as ``flowchat run``); ``settings`` is the process's
    read-only configuration; ``clock`` is the time source of delays and backoff
    (``flowchat.testing`` swaps in a fake one).
    """

    def __init__(
        self,
        http: aiohttp.ClientSession | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        extra: Mapping[str, Any] | None = None,
        settings: Settings | None = None,
        redis: Redis | None = None,
        keys: Keys | None = None,
        secrets: Secrets | None = None,
    ) -> None:
        self._http = http
        self._own_http = False
        self.clock = clock
        self.sleep = sleep
        """How an in-process run waits (``flowchat run``); ``flowchat.testing`` jumps its fake clock instead."""
        self.extra: dict[str, Any] = dict(extra or {})
        self.settings = settings if settings is not None else Settings()
        self.redis = redis
        self.keys = keys
        self.secrets = secrets if secrets is not None else Secrets()
        """The process's secrets: templates read them, :meth:`Secrets.mask` hides them in outputs."""
        self.failed: dict[str, str] = {}
        """Services whose factory raised at start-up, with the reason (``get`` names it)."""

    @property
    def http(self) -> aiohttp.ClientSession:
        """The process's shared HTTP session (made on first use where none was handed in)."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(raise_for_status=False)
            self._own_http = True
        return self._http

    def get(self, name: str) -> Any:
        """The service ``name``; a node that needs one declares it in its ``services``."""
        try:
            return self.extra[name]
        except KeyError:
            pass
        if name in self.failed:
            raise ServiceMissing(f"service {name!r} failed to start: {self.failed[name]}", code="service-unavailable")
        raise ServiceMissing(
            f"service {name!r} is not available in this runtime (declare it in the node's `services` "
            "and install the package that provides it)"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.extra

    async def aclose(self) -> None:
        """Close the HTTP session if this object made it."""
        if self._own_http and self._http is not None:
            await self._http.close()


def service_names(distribution: str | None = None) -> set[str]:
    """Names of the installed services (of one ``distribution`` if given): what flows may declare they need."""
    return {
        entry_point.name
        for entry_point in importlib.metadata.entry_points(group=SERVICES_GROUP)
        if distribution is None or (entry_point.dist is not None and entry_point.dist.name == distribution)
    }


@asynccontextmanager
async def open_services(
    settings: Settings | None = None,
    *,
    redis: Redis | None = None,
    keys: Keys | None = None,
    only: Iterable[str] | None = None,
    factories: Mapping[str, Factory] | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    **extra: Any,
) -> AsyncIterator[Services]:
    """Services with a live HTTP session and the installed services started; all closed on exit.

    ``only`` limits which installed services start (``flowchat run`` starts those its flow
    declares); ``factories`` adds or replaces factories (tests); ``extra`` adds ready objects.
    A factory that raises is logged, and ``get`` of that service then names the failure.
    """
    settings = settings if settings is not None else Settings.from_env()
    secrets = Secrets.from_settings(settings)
    add_secret_values(secrets.values())  # log lines never carry them either
    chosen = {**_entry_point_loaders(), **{name: _ready(factory) for name, factory in (factories or {}).items()}}
    if only is not None:
        wanted = set(only)
        chosen = {name: loader for name, loader in chosen.items() if name in wanted}
    async with aiohttp.ClientSession(raise_for_status=False) as http:
        services = Services(
            http, clock=clock, sleep=sleep, extra=extra, settings=settings, redis=redis, keys=keys, secrets=secrets
        )
        started: list[tuple[str, Any]] = []
        try:
            for name, loader in chosen.items():
                if name in services.extra:
                    continue  # a ready object handed in wins
                try:
                    instance = await _start(loader(), settings, services)
                except Exception as exc:  # a plugin's factory may raise anything
                    reason = f"{type(exc).__name__}: {exc}"
                    log.error("[service-failed] service %r failed to start: %s", name, reason)
                    services.failed[name] = reason
                    continue
                services.extra[name] = instance
                started.append((name, instance))
            yield services
        finally:
            for name, instance in reversed(started):
                await _close(name, instance)


def _entry_point_loaders() -> dict[str, Callable[[], Factory]]:
    loaders: dict[str, Callable[[], Factory]] = {}
    for entry_point in importlib.metadata.entry_points(group=SERVICES_GROUP):
        loaders.setdefault(entry_point.name, entry_point.load)
    return loaders


def _ready(factory: Factory) -> Callable[[], Factory]:
    return lambda: factory


async def _start(factory: Factory, settings: Settings, services: Services) -> Any:
    """Call ``factory(settings)`` or ``factory(settings, services)``, awaiting it if async."""
    result = factory(settings, services) if _takes_two(factory) else factory(settings)
    if inspect.isawaitable(result):
        result = await result
    return result


def _takes_two(factory: Factory) -> bool:
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


async def _close(name: str, instance: Any) -> None:
    close = getattr(instance, "aclose", None) or getattr(instance, "close", None)
    if not callable(close):
        return
    try:
        result = close()
        if inspect.isawaitable(result):
            await result
    except Exception as exc:  # closing one service must not keep the others open
        log.warning("service %r did not close cleanly: %s: %s", name, type(exc).__name__, exc)
