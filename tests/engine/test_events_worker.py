"""A worker appends execution and node_run events beside its own writes."""

from __future__ import annotations

import asyncio
from typing import Any

from support import enqueue, settled, stream_events, wait_for, write_flow

from flowchat import open_services
from flowchat.settings import Settings
from flowchat.worker import Worker, WorkerSettings

CRM = ("events", "contacts", "limiter")


async def run_one(queue, catalog, services, events: int = 6) -> None:
    """Run the catalog's one flow once on a worker; wait for ``events`` events (rows) on the stream."""
    worker = Worker(queue, catalog, services, WorkerSettings(concurrency=4, block_ms=50, visibility_timeout=2))
    task = asyncio.create_task(worker.run())
    try:
        [name] = catalog.flows
        await settled(queue, await enqueue(queue, catalog, name))

        async def all_there() -> bool:
            return len(stream_events(await queue.redis.xrange(queue.keys.events))) >= events

        await wait_for(all_there)
        await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await task


async def test_a_worker_emits_one_execution_event_carrying_every_node_run(queue, flows_dir, catalog_factory) -> None:
    write_flow(
        flows_dir,
        "evented",
        "  - {id: first, type: set, with: {values: {a: 1}}}\n"
        "  - {id: skipped, type: set, needs: [first], when: false, with: {values: {}}}\n"
        "  - {id: count, type: metric, needs: [first], with: {name: leads, value: 2, tags: {source: web}}}\n"
        "  - {id: boom, type: delay, needs: [count], with: {until: 'not a time'}}\n",
    )
    catalog = catalog_factory(flows_dir)
    async with open_services(Settings(), redis=queue.redis, keys=queue.keys, only=CRM) as services:
        await run_one(queue, catalog, services, events=6)  # a metric, four node runs, the execution
    raw = await queue.redis.xrange(queue.keys.events)
    assert not any(fields[b"type"] == b"node_run" for _, fields in raw)  # runs ride their execution's writes
    entries = stream_events(raw)
    execution_id = entries[0]["execution_id"]
    for item in entries:
        assert set(item) == {"id", "type", "ts", "flow", "execution_id", "node", "data"}
        assert item["flow"] == "evented" and item["execution_id"] == execution_id and int(item["ts"]) > 0
    assert len({item["id"] for item in entries}) == len(entries) == 6
    by_type: dict[str, list[dict[str, Any]]] = {}
    for item in entries:
        by_type.setdefault(item["type"], []).append(item)
    runs = {run["node"]: run["data"] for run in by_type["node_run"]}
    assert len(runs) == 4
    assert {node: data["status"] for node, data in runs.items()} == {
        "first": "ok",
        "skipped": "skipped",
        "count": "ok",
        "boom": "failed",
    }
    assert runs["boom"]["error_code"] == "delay-bad-time" and runs["first"]["node_type"] == "set"
    [metric] = by_type["metric"]
    assert metric["node"] == "count" and metric["data"] == {"name": "leads", "value": 2, "tags": {"source": "web"}}
    [execution] = by_type["execution"]
    data = execution["data"]
    assert execution["node"] == "" and data["status"] == "failed" and data["error_code"] == "delay-bad-time"
    assert data["trigger_type"] == "webhook" and data["duration_ms"] >= 0 and data["finished_at"] >= data["started_at"]


async def test_with_analytics_off_a_worker_writes_no_event(queue, flows_dir, catalog_factory) -> None:
    write_flow(flows_dir, "quiet", "  - {id: count, type: metric, with: {name: n, value: 1}}\n")
    catalog = catalog_factory(flows_dir)
    settings = Settings.from_env({"FLOWCHAT_ANALYTICS": "off"})
    async with open_services(settings, redis=queue.redis, keys=queue.keys, only=CRM) as services:
        await run_one(queue, catalog, services, events=0)
    assert not await queue.redis.exists(queue.keys.events)
