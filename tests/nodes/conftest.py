"""Factories for node tests: load a flow from YAML text, run it with real services,
and start local HTTP servers (no test ever reaches the internet)."""

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import support
from aiohttp import web

import flowchat
from flowchat import testing

RunFlow = Callable[..., Awaitable[flowchat.Execution]]
StartServer = Callable[[Iterable[web.RouteDef]], Awaitable[str]]


@pytest.fixture(scope="session")
def builtin_registry() -> flowchat.Registry:
    """The built-in node types only: no plugins folder, no entry points."""
    registry = flowchat.Registry()
    registry.load_builtins()
    assert registry.errors == []
    return registry


@pytest.fixture
def write_flow(tmp_path: Path) -> Callable[..., Path]:
    """``support.write_flow`` bound to this test's folder: ``write_flow(nodes)`` writes ``flow.yaml``."""

    def write(nodes: support.Nodes, *, folder: Path | None = None) -> Path:
        return support.write_flow(folder or tmp_path, "flow", nodes, vars={})

    return write


@pytest.fixture
def run_flow(write_flow: Callable[..., Path], builtin_registry: flowchat.Registry) -> RunFlow:
    """Load a flow and run it over ``trigger`` with a live aiohttp session."""

    async def run(
        nodes: str | Path, trigger: dict[str, Any] | None = None, *, execution_id: str | None = None
    ) -> flowchat.Execution:
        path = nodes if isinstance(nodes, Path) else write_flow(nodes)
        # real time: these tests measure Retry-After and timeouts
        return await testing.run_flow(path, trigger, fast_forward=False, registry=builtin_registry, execution_id=execution_id)

    return run


@pytest.fixture
async def http_server() -> AsyncIterator[StartServer]:
    """Start a local aiohttp app with the given routes; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(routes: Iterable[web.RouteDef]) -> str:
        app = web.Application()
        app.add_routes(list(routes))
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()
