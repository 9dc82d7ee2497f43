"""The `flowchat.services` seam: installed factories started once per process, reached by nodes."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import TEST_PLUGINS, daemon_env, enqueue, install_dist, run_cli, settled, wait_for, write_flow

import flowchat
from flowchat.catalog import Catalog
from flowchat.registry import load_registry
from flowchat.services import Services, open_services
from flowchat.settings import Settings

SERVICE_MODULE = textwrap.dedent(
    '''
    """A counter service kept in the runtime's Redis, and a node that uses it."""
    from typing import Any

    from flowchat import Node, NodeConfig, NodeContext, register


    class Counter:
        def __init__(self, redis: Any, prefix: str) -> None:
            self.redis, self.prefix = redis, prefix

        async def bump(self, name: str) -> int:
            return int(await self.redis.incr(f"{self.prefix}:{name}"))

        async def aclose(self) -> None:
            await self.redis.incr(f"{self.prefix}:closed")


    async def open_counter(settings: Any, services: Any) -> Counter:
        await services.redis.incr("fc-test:counter:started")
        return Counter(services.redis, "fc-test:counter")


    @register
    class Bump(Node):
        """Count a name in the counter service."""

        type = "test.bump"
        services = ("counter",)

        class Config(NodeConfig):
            name: str

        async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
            return {"count": await ctx.services.get("counter").bump(config.name)}
    '''
)


@pytest.fixture
def counter_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = install_dist(
        tmp_path / "site",
        "fc-test-counter",
        {"fc_test_counter": SERVICE_MODULE},
        {
            "flowchat.services": {"counter": "fc_test_counter:open_counter"},
            "flowchat.nodes": {"bump": "fc_test_counter"},
        },
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("fc_test_counter", None)


BUMP_NODES = "- {id: bump, type: test.bump, with: {name: '{{ trigger.who }}'}}"


async def test_factories_get_settings_or_settings_and_services_and_are_closed_in_reverse(redis):
    events: list[str] = []

    class Thing:
        def __init__(self, name: str) -> None:
            self.name = name

        async def aclose(self) -> None:
            events.append(f"aclose {self.name}")

    class Plain:
        def close(self) -> None:
            events.append("close plain")

    async def one(settings: Settings) -> Thing:
        events.append(f"start one queue={settings.queue}")
        return Thing("one")

    async def two(settings: Settings, services: Services) -> Thing:
        assert services.redis is redis
        assert services.get("one").name == "one"  # started before it
        events.append("start two")
        return Thing("two")

    def plain(settings: Settings) -> Plain:
        return Plain()

    settings = Settings(queue="q1")
    factories = {"one": one, "two": two, "plain": plain}
    async with open_services(settings, redis=redis, factories=factories) as services:
        assert services.settings is settings
        assert not services.http.closed
        assert services.get("two").name == "two"
        assert "plain" in services
    assert events == ["start one queue=q1", "start two", "close plain", "aclose two", "aclose one"]


async def test_a_failing_or_missing_service_is_a_clear_node_error():
    async def broken(settings: Settings) -> object:
        raise RuntimeError("CRM_URL is not set")

    async with open_services(Settings(), factories={"crm": broken}) as services:
        with pytest.raises(flowchat.NodeError) as failed:
            services.get("crm")
        with pytest.raises(flowchat.NodeError) as missing:
            services.get("nothing")
    assert failed.value.code == "service-unavailable"
    assert "RuntimeError: CRM_URL is not set" in failed.value.message
    assert missing.value.code == "service-missing"
    assert isinstance(missing.value, KeyError)  # callers probing with `except KeyError` keep working
    assert str(missing.value).startswith("[service-missing] service 'nothing'")
    assert "'nothing'" in missing.value.message


async def test_http_is_always_there_even_without_a_runtime_session():
    services = Services()
    try:
        assert not services.http.closed
        assert services.http is services.http
    finally:
        await services.aclose()


async def test_an_installed_service_is_started_once_and_reached_by_its_node(counter_site, redis, tmp_path):
    registry = load_registry(tmp_path / "no-plugins")
    assert "counter" in registry.services
    flow_file = write_flow(tmp_path, "bumps", BUMP_NODES)
    flow = flowchat.load_flow(flow_file, registry)
    assert flow.services == {"counter"}

    async with open_services(Settings(), redis=redis) as services:
        runner = flowchat.Runner(services)
        for _ in range(3):
            execution = await runner.run(flow, flowchat.Execution.new(flow, {"who": "ada"}))
            assert execution.status == "succeeded", execution.error
    assert execution.nodes["bump"].output == {"count": 3}
    assert await redis.get("fc-test:counter:started") == b"1"
    assert await redis.get("fc-test:counter:closed") == b"1"


def test_a_flow_whose_node_needs_a_missing_service_is_refused_at_load_time(counter_site, tmp_path):
    registry = load_registry(tmp_path / "no-plugins")
    registry.services.discard("counter")  # as where the node is installed but not its service
    flow_file = write_flow(tmp_path, "bumps", BUMP_NODES)

    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(flow_file, registry)

    (problem,) = caught.value.errors
    assert problem.code == "service-missing"
    assert "'counter'" in problem.message and "'test.bump'" in problem.message
    assert (problem.location.line, problem.location.col) == (4, 22)


def test_validate_reports_the_missing_service(counter_site, tmp_path):
    # the node comes from a plugins folder; no package provides its service
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bumper.py").write_text(SERVICE_MODULE.replace("fc_test_counter", "x"))
    flow_file = write_flow(tmp_path, "bumps", BUMP_NODES)

    env = daemon_env("unused", FLOWCHAT_PLUGINS=str(plugins))
    result = run_cli("validate", flow_file, env=env)
    assert result.returncode == 1
    assert "[service-missing]" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_worker_process_starts_installed_services_with_its_redis_and_closes_them(
    counter_site, queue, redis_url, flows_dir, processes
):
    write_flow(flows_dir, "bumps", BUMP_NODES)
    env = daemon_env(redis_url, PYTHONPATH=str(counter_site), FLOWCHAT_COMPACT_SUCCEEDED="0")  # outputs read after
    worker = processes.start("worker", "--flows", str(flows_dir), env=env)
    catalog = Catalog(flows_dir, load_registry(TEST_PLUGINS))
    catalog.reload()

    ids = [await enqueue(queue, catalog, "bumps", {"who": "ada"}) for _ in range(5)]
    outcomes = [await settled(queue, execution_id) for execution_id in ids]

    assert all(outcome["status"] == "succeeded" for outcome in outcomes), outcomes
    counts = []
    for execution_id in ids:
        stored = await queue.get(execution_id)
        assert stored is not None
        counts.append(stored[1]["bump"]["output"]["count"])
    assert sorted(counts) == [1, 2, 3, 4, 5]
    assert await queue.redis.get("fc-test:counter:started") == b"1"
    worker.terminate()
    assert worker.wait(15) == 0
    await wait_for(lambda: queue.redis.get("fc-test:counter:closed"))
