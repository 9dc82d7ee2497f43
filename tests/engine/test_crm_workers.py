"""CRM nodes under two real worker processes on one real Redis: exact, whatever the interleaving."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from support import ROOT, daemon_env, settled, stream_events, wait_for, write_flow

from flowchat.contacts import Contacts
from flowchat.keys import Keys
from flowchat.loader import load_flow
from flowchat.queue import Queue
from flowchat.redis_server import free_port
from flowchat.registry import load_registry


async def run_on_two_workers(
    queue: Queue, processes: Any, redis_url: str, flow_file: Path, triggers: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    env = daemon_env(redis_url, FLOWCHAT_COMPACT_SUCCEEDED="0")  # the tests read node outputs after success
    for _ in range(2):
        processes.start("worker", "--flows", str(flow_file.parent), "--concurrency", "16", env=env)
    flow = load_flow(flow_file, load_registry())
    await queue.store_flow(flow)
    ids = await queue.enqueue_many(flow.name, flow.version, triggers)

    async def finished() -> bool:
        succeeded = await queue.redis.hget(queue.keys.counters, f"succeeded:{flow.name}")
        return int(succeeded or 0) >= len(ids)

    await wait_for(finished, timeout=60, interval=0.05)
    stored = [await queue.get(execution_id) for execution_id in ids]
    return [{"meta": item[0], "nodes": item[1]} for item in stored if item]


async def test_two_workers_tagging_one_contact_80_times_lose_no_tag(queue, redis_url, flows_dir, processes):
    flow = write_flow(
        flows_dir,
        "tagger",
        """
        - id: tag
          type: contact.tag
          with: {phone: '+1 415 555 0100', add: ['t{{ trigger.n }}'], groups_add: ['g{{ trigger.n % 3 }}']}
        """,
    )
    runs = await run_on_two_workers(queue, processes, redis_url, flow, [{"n": n} for n in range(80)])
    assert len(runs) == 80
    contact = await Contacts(queue.redis, Keys("fc")).get("+14155550100")
    assert contact is not None
    assert sorted(contact["tags"]) == sorted(f"t{n}" for n in range(80))
    assert contact["groups"] == ["g0", "g1", "g2"]
    # every index agrees with the contact, and each execution saw its own tag added exactly once
    for n in range(80):
        assert await queue.redis.sismember(Keys("fc").contacts_tagged(f"t{n}"), "+14155550100")
    assert sorted(run["nodes"]["tag"]["output"]["added"][0] for run in runs) == sorted(f"t{n}" for n in range(80))


async def test_two_workers_upserting_the_same_new_phones_create_each_exactly_once(
    queue, redis_url, flows_dir, processes
):
    flow = write_flow(
        flows_dir,
        "upserts",
        "- {id: up, type: contact.upsert, with: {phone: '+4420794600{{ trigger.p }}', name: 'N{{ trigger.n }}'}}",
    )
    triggers = [{"p": f"{p:02d}", "n": n} for p in range(20) for n in range(4)]
    runs = await run_on_two_workers(queue, processes, redis_url, flow, triggers)
    created: dict[str, int] = {}
    for run in runs:
        output = run["nodes"]["up"]["output"]
        created[output["phone"]] = created.get(output["phone"], 0) + int(output["created"])
    assert len(created) == 20
    assert set(created.values()) == {1}


async def test_rate_limit_skip_allows_exactly_limit_across_two_workers(queue, redis_url, flows_dir, processes):
    flow = write_flow(
        flows_dir,
        "paced",
        """
        - {id: gate, type: rate_limit, with: {key: campaign, limit: 7, per: 10m, on_limit: skip}}
        - {id: after, type: set, needs: [gate], when: '{{ gate.allowed }}', with: {values: {sent: true}}}
        """,
    )
    runs = await run_on_two_workers(queue, processes, redis_url, flow, [{"n": n} for n in range(60)])
    allowed = [run for run in runs if run["nodes"]["gate"]["output"]["allowed"]]
    assert len(allowed) == 7
    assert sum(run["nodes"]["after"]["status"] == "ok" for run in runs) == 7
    refused = [run["nodes"]["gate"]["output"] for run in runs if not run["nodes"]["gate"]["output"]["allowed"]]
    assert all(out["retry_after_ms"] > 0 and out["remaining"] == 0 for out in refused)


async def test_rate_limit_delay_lets_every_execution_through_and_none_before_its_slot(
    queue, redis_url, flows_dir, processes
):
    limit, per, count = 4, 1.6, 14  # a slot every 0.4 s after a burst of 4
    pacing = {"key": "drip", "limit": limit, "per": f"{per}s", "on_limit": "delay"}
    flow = write_flow(flows_dir, "delayed", [{"id": "gate", "type": "rate_limit", "with": pacing}])
    runs = await run_on_two_workers(queue, processes, redis_url, flow, [{"n": n} for n in range(count)])
    assert len(runs) == count
    gates = [run["nodes"]["gate"] for run in runs]
    assert all(gate["status"] == "ok" and gate["output"]["allowed"] for gate in gates)
    times = sorted(gate["finished_at"] for gate in gates)
    interval, slack = per / limit, 0.05
    # GCRA: between the i-th and j-th allowed, at least (j - i - burst + 1) intervals passed
    for i in range(count):
        for j in range(i + 1, count):
            assert times[j] - times[i] >= (j - i - limit + 1) * interval - slack, (i, j, times)
    waited = [gate for gate in gates if gate["started_at"] < gate["finished_at"] - interval / 2]
    assert len(waited) >= count - limit - 1  # most were parked, not let through early


async def test_the_shipped_welcome_flow_runs_end_to_end_through_the_daemon(
    queue, redis_url, flows_dir, processes
) -> None:
    """flows/welcome.yaml under `flowchat serve`: lookup → upsert → tag → rate limit → metric."""
    shutil.copy(ROOT / "flows" / "welcome.yaml", flows_dir / "welcome.yaml")
    port = free_port()
    env = daemon_env(redis_url, FLOWCHAT_WEBHOOK_TOKEN="s3cret-token", FLOWCHAT_COMPACT_SUCCEEDED="0")
    processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=env)
    payload = orjson.loads((ROOT / "examples" / "welcome.input.json").read_bytes())
    ids = []
    async with aiohttp.ClientSession() as http:
        for n in range(2):
            headers = {"Authorization": "Bearer s3cret-token", "Idempotency-Key": f"w{n}"}
            async with http.post(f"http://127.0.0.1:{port}/hooks/welcome", json=payload, headers=headers) as answer:
                assert answer.status == 202, await answer.text()
                ids.append((await answer.json())["execution_id"])
            await settled(queue, ids[-1])
    first, second = [(await queue.get(execution_id)) for execution_id in ids]
    assert first is not None and second is not None
    assert first[0]["status"] == second[0]["status"] == "succeeded"
    assert first[1]["known"]["output"]["found"] is False and second[1]["known"]["output"]["found"] is True
    assert first[1]["contact"]["output"]["created"] is True and second[1]["contact"]["output"]["created"] is False
    assert first[1]["tags"]["output"]["tags"] == ["customer", "vip"]
    assert first[1]["once_a_day"]["output"]["allowed"] is True and second[1]["once_a_day"]["output"]["allowed"] is False
    assert first[1]["paced"]["status"] == "ok" and second[1]["paced"]["status"] == "skipped"
    contact = await Contacts(queue.redis, Keys("fc")).get("+14155550142")
    assert contact is not None and contact["name"] == "Grace Hopper" and contact["groups"] == ["welcome-2026"]

    async def events_in() -> bool:
        kinds = [event["type"] for event in stream_events(await queue.redis.xrange(Keys("fc").events))]
        return kinds.count("execution") == 2

    await wait_for(events_in)
    entries = stream_events(await queue.redis.xrange(Keys("fc").events))
    metrics = [e["data"] for e in entries if e["type"] == "metric"]
    assert [m["tags"] for m in metrics] == [
        {"returning": "no", "welcomed": "yes", "plan": "pro"},
        {"returning": "yes", "welcomed": "no", "plan": "pro"},
    ]
    actions = [e["data"]["action"] for e in entries if e["type"] == "contact"]
    assert actions == ["created", "tagged", "grouped"]  # the second run changed nothing
    runs = [e for e in entries if e["type"] == "node_run" and e["execution_id"] == ids[0]]
    assert sorted(e["node"] for e in runs) == sorted(first[1])
