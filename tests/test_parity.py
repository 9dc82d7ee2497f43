"""What runs in `flowchat run` runs the same in the daemon.

Every built-in node type, the example plugin and every file in examples/ and flows/ goes
through a real `flowchat worker` process on a real redis-server (HTTP nodes against a local
server) and through `flowchat run --json`'s code over the same input; the stored trace and the
printed one must agree: the execution's status, each node's status, attempts and output,
nodes in flow order.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support import ROOT, Nodes, daemon_env, settled, write_flow

from flowchat import load_flow, load_registry, open_services
from flowchat.cli import run_in_process
from flowchat.codec import execution_json
from flowchat.flow import trigger_payload
from flowchat.operations import load_execution
from flowchat.settings import Settings

VOLATILE = frozenset({"sid", "waited_until", "date", "tick", "at"})
"""Keys whose values differ between two runs by nature (ids minted per send, clocks; consent times ``at`` and every ``*_at``)."""


def built_in_cases(base: str) -> dict[str, tuple[Nodes, dict[str, Any]]]:
    """One small flow per built-in node type (and the example plugin): name -> (nodes, trigger)."""
    return {
        "node_set": (
            "  - {id: s, type: set, with: {values: {n: '{{ trigger.n + 1 }}', tags: \"{{ trigger.tags | map('upper') }}\", "
            "pair: '{{ {1: trigger.n} }}'}}}\n",
            {"n": 41, "tags": ["a", "b"]},
        ),
        "node_log": (
            "  - {id: l, type: log, with: {message: 'hi {{ trigger.name }}', level: warning}}\n",
            {"name": "Ana"},
        ),
        "node_validate": (
            "  - {id: v, type: validate, with: {schema: {type: object, required: [phone]}, on_invalid: continue}}\n"
            "  - {id: after, type: set, with: {values: {ok: '{{ v.valid }}'}}}\n",
            {"name": "Ana"},
        ),
        "node_http": (
            [
                {"id": "get", "type": "http.request", "with": {"url": f"{base}/contact"}},
                {
                    "id": "post",
                    "type": "http.request",
                    "with": {"method": "POST", "url": f"{base}/echo", "json": {"id": "{{ get.json.id }}"}},
                },
                {
                    "id": "read",
                    "type": "set",
                    "with": {"values": {"type": "{{ post.headers['content-type'] }}", "back": "{{ post.json }}"}},
                },
            ],
            {},
        ),
        "node_http_failing": ([{"id": "gone", "type": "http.request", "with": {"url": f"{base}/missing"}}], {}),
        "node_delay": (
            "  - {id: wait, type: delay, with: {for: 300ms}}\n"
            "  - {id: past, type: delay, with: {until: '2020-01-01T00:00:00Z'}}\n",
            {},
        ),
        "node_greeting": (
            "  - {id: hi, type: example.greeting, with: {name: '{{ trigger.name }}', language: pt}}\n",
            {"name": "Ana"},
        ),
        "node_contact_consent": (
            "  - {id: out, type: contact.consent, with: {phone: '{{ trigger.phone }}', state: opted_out, source: form}}\n"
            "  - {id: back, type: contact.consent, with: {phone: '{{ out.phone }}', state: opted_in, source: form}}\n",
            {"phone": "+15551230199"},
        ),
    }


@pytest.fixture
async def api() -> AsyncIterator[str]:
    async def contact(request: web.Request) -> web.Response:
        return web.json_response({"id": 42, "tags": ["vip"]})

    async def echo(request: web.Request) -> web.Response:
        response = web.json_response(await request.json())
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    app = web.Application()
    app.router.add_get("/contact", contact)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


def normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: "<varies>" if key in VOLATILE or key.endswith("_at") else normalise(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [normalise(item) for item in value]
    return value


def trace(execution: dict[str, Any]) -> dict[str, Any]:
    """What must agree: statuses, attempts, outputs, error codes, node order."""
    nodes = execution["nodes"]
    return {
        "status": execution["status"],
        "error": (execution["error"] or {}).get("code"),
        "order": list(nodes),
        "nodes": {
            node_id: (
                run["status"],
                run["attempts"],
                normalise(run["output"]),
                (run["error"] or {}).get("code"),
            )
            for node_id, run in nodes.items()
        },
    }


async def run_like_the_cli(path: Path, trigger: dict[str, Any], registry: Any, settings: Settings) -> dict[str, Any]:
    """What `flowchat run FILE --input - --json --fast-forward` prints (its code, in this process: fast)."""
    flow = load_flow(path, registry)
    execution = await run_in_process(flow, trigger_payload(flow, trigger), fast_forward=True, settings=settings)
    return json.loads(json.dumps(execution_json(execution), default=str))


async def record_inbound_messages(settings: Settings, triggers: list[dict[str, Any]]) -> None:
    """What ingress does before a Twilio flow runs: record the inbound message on its contact."""
    async with open_services(settings) as services:
        if "contacts" not in services:
            return
        for trigger in triggers:
            if "MessageSid" in trigger:
                await services.get("contacts").record_inbound(
                    trigger["From"],
                    profile_name=trigger.get("ProfileName"),
                    message_sid=trigger["MessageSid"],
                    at_ms=int(time.time() * 1000),
                )


async def test_flowchat_run_and_a_worker_process_agree(queue, redis_url, processes, tmp_path, api):
    folder = tmp_path / "flows"
    folder.mkdir()
    cases: dict[str, tuple[Path, dict[str, Any]]] = {}
    for source in sorted([*(ROOT / "examples").iterdir(), *(ROOT / "flows").iterdir()]):
        if source.is_file():  # examples/deploy is a folder of deployment files, not flows
            shutil.copy(source, folder / source.name)  # flows with the files they read (schemas)
    for path in sorted(folder.glob("*.yaml")):
        sample = folder / f"{path.stem}.input.json"
        cases[path.stem] = (path, json.loads(sample.read_text()) if sample.exists() else {})
    for name, (nodes, trigger) in built_in_cases(api).items():
        cases[name] = (write_flow(folder, name, nodes), trigger)

    env = daemon_env(
        redis_url,
        FLOWCHAT_PLUGINS=str(ROOT / "plugins"),
        FLOWCHAT_DATA_DIR=str(tmp_path / "data"),
        FLOWCHAT_RECIPIENT_RATE="100/1s",  # several flows message one phone; pacing is not what is compared
        FLOWCHAT_COMPACT_SUCCEEDED="0",  # the whole trace, outputs included, stays after success
    )
    registry = load_registry(ROOT / "plugins")
    worker_settings = Settings.from_env(env)
    # flows with state (contacts, limits) start from the same state on both sides: separate databases
    settings = Settings.from_env({**env, "FLOWCHAT_REDIS_URL": redis_url.rsplit("/", 1)[0] + "/1"})
    for side in (worker_settings, settings):
        await record_inbound_messages(side, [trigger for _, trigger in cases.values()])

    in_process = [await run_like_the_cli(path, trigger, registry, settings) for path, trigger in cases.values()]
    processes.start("worker", "--flows", str(folder), env=env)
    traces: dict[str, Any] = {}
    for (name, (path, trigger)), printed in zip(cases.items(), in_process, strict=True):
        # one at a time, in the same order as above: state shared between flows evolves alike
        flow = load_flow(path, registry)
        await queue.store_flow(flow)
        execution_id, _ = await queue.enqueue(flow.name, flow.version, trigger)
        await settled(queue, execution_id)
        stored = await load_execution(queue, execution_id)
        assert stored is not None
        worker_side, run_side = trace(stored.to_dict()), trace(printed)
        differing = {
            node: (worker_side["nodes"].get(node), run_side["nodes"].get(node))
            for node in {*worker_side["nodes"], *run_side["nodes"]}
            if worker_side["nodes"].get(node) != run_side["nodes"].get(node)
        }
        assert worker_side == run_side, f"{name}: {differing}"
        traces[name] = trace(printed)
    covered = {node.type for path, _ in cases.values() for node in load_flow(path, registry).nodes.values()}
    assert set(registry.names()) <= covered, f"node types no case runs: {set(registry.names()) - covered}"
    statuses = {name: printed["status"] for name, printed in zip(cases, in_process, strict=True)}
    assert statuses.pop("node_http_failing") == "failed"
    assert set(statuses.values()) == {"succeeded"}, statuses
    # the output contract, seen the same way by both
    assert traces["node_set"]["nodes"]["s"][2] == {"n": 42, "tags": ["A", "B"], "pair": {"1": 41}}
    assert traces["node_http"]["nodes"]["read"][2]["type"] == "application/json; charset=utf-8"
    assert traces["node_http"]["nodes"]["post"][2]["headers"]["set-cookie"] == ["a=1", "b=2"]
