"""The services a runtime hands to nodes (nodes never build clients themselves)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Services:
    """Shared clients and helpers for nodes: ``ctx.services.http`` and friends."""

    http: aiohttp.ClientSession | None = None
    clock: Callable[[], float] = time.time
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        """A named service added by the runtime (``extra``)."""
        return self.extra[name]


@asynccontextmanager
async def open_services(**extra: Any) -> AsyncIterator[Services]:
    """Services with a live HTTP session, closed on exit."""
    async with aiohttp.ClientSession(raise_for_status=False) as http:
        yield Services(http=http, extra=dict(extra))
