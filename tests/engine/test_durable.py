"""The durable path through a real worker process: outputs that cannot be stored fail their node
at once, and no side effect is repeated by a take-over (a recorder server counts every request)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from support import daemon_env, enqueue, settled, write_flow

from flowchat.keys import GROUP
from flowchat.operations import load_execution


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[str, Counter[str]]]:
    """A local HTTP server counting requests per ``?e=<execution>``; it answers JSON with repeated headers."""
    seen: Counter[str] = Counter()

    async def record(request: web.Request) -> web.Response:
        seen[request.query.get("e", "")] += 1
        response = web.json_response({"id": 7, "ok": True})
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        response.headers.add("X-Tag", "one")
        response.headers.add("X-Tag", "two")
        return response

    app = web.Application()
    app.router.add_route("*", "/record", record)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/record", seen
    await runner.cleanup()


def post_then(url: str, after: dict[str, Any]) -> list[dict[str, Any]]:
    """A POST to the recorder tagged with the execution id, then ``after``."""
    post = {"method": "POST", "url": url + "?e={{ execution.id }}", "json": {"name": "{{ trigger.name }}"}}
    return [{"id": "call", "type": "http.request", "with": post}, after]


async def nothing_left_to_take_over(queue, execution_id: str) -> None:
    """Acknowledged and off the ready stream: no worker can ever run it again."""
    assert (await queue.redis.xpending(queue.keys.ready, GROUP))["pending"] == 0
    assert await queue.redis.xlen(queue.keys.ready) == 0
    assert await queue.redis.zscore(queue.keys.delayed, execution_id) is None


async def test_http_request_outputs_are_stored_with_lower_case_headers_and_sent_once(
    queue, redis_url, flows_dir, catalog_factory, processes, recorder
):
    url, seen = recorder
    read = {"id": "read", "type": "set", "with": {"values": {"type": "{{ call.headers['content-type'] }}"}}}
    write_flow(flows_dir, "crm", post_then(url, read))
    catalog = catalog_factory(flows_dir)
    env = daemon_env(redis_url, FLOWCHAT_COMPACT_SUCCEEDED="0")  # outputs stay after success
    processes.start("worker", "--flows", str(flows_dir), env=env)
    ids = [await enqueue(queue, catalog, "crm", {"name": f"lead {n}"}) for n in range(3)]

    for execution_id in ids:
        assert (await settled(queue, execution_id))["status"] == "succeeded"
    execution = await load_execution(queue, ids[0])
    assert execution is not None
    headers = execution.nodes["call"].output["headers"]
    assert headers["content-type"].startswith("application/json")
    assert headers["set-cookie"] == ["a=1", "b=2"]
    assert headers["x-tag"] == "one, two"
    assert execution.nodes["read"].output == {"type": headers["content-type"]}
    assert seen == Counter(ids)  # one request per execution
    await nothing_left_to_take_over(queue, ids[-1])


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("int_keys", {"1": "one", "2": "two"}),
        ("generator", {"items": [0, 1, 4]}),
        ("bytes", {"raw": "hello"}),
        ("datetime", {"at": "2026-01-02T03:04:05+00:00"}),
        ("object", None),
        ("big", None),
    ],
)
async def test_awkward_outputs_convert_or_fail_their_node_at_once_and_the_call_happens_once(
    queue, redis_url, flows_dir, catalog_factory, processes, recorder, kind, expected
):
    url, seen = recorder
    write_flow(flows_dir, "awkward", post_then(url, {"id": "odd", "type": "test.output", "with": {"kind": kind}}))
    catalog = catalog_factory(flows_dir)
    env = daemon_env(redis_url, FLOWCHAT_MAX_OUTPUT="2048", FLOWCHAT_COMPACT_SUCCEEDED="0")
    processes.start("worker", "--flows", str(flows_dir), env=env)
    execution_id = await enqueue(queue, catalog, "awkward", {"name": "Ana"})

    meta = await settled(queue, execution_id)  # in seconds, not after visibility timeouts

    execution = await load_execution(queue, execution_id)
    assert execution is not None
    if expected is not None:
        assert meta["status"] == "succeeded"
        assert execution.nodes["odd"].output == expected
    else:
        code = "node-output-invalid" if kind == "object" else "node-output-too-large"
        assert meta["status"] == "failed"
        assert meta["error"]["code"] == code and meta["error"]["node"] == "odd"
        assert execution.nodes["odd"].attempts == 1
        [letter] = await queue.dead_letters()
        assert (letter["e"], letter["node"], letter["code"]) == (execution_id, "odd", code)
        if kind == "object":
            assert "output.thing" in letter["message"] and "_Opaque" in letter["message"]
    assert seen == Counter({execution_id: 1})
    await nothing_left_to_take_over(queue, execution_id)


async def test_a_crash_loop_is_poison_naming_the_node_it_was_running(queue, flows_dir, catalog_factory, start_worker):
    write_flow(flows_dir, "crashy", "- {id: first, type: test.noop}\n- {id: second, type: test.noop}")
    catalog = catalog_factory(flows_dir)
    execution_id = await enqueue(queue, catalog, "crashy")
    key = queue.keys.execution(execution_id)
    failed_before = '{"code": "test-missing", "message": "gone", "retryable": true}'
    await queue.redis.hset(key, "n:first", '{"id": "first", "type": "test.noop", "status": "ok", "attempts": 1}')
    await queue.redis.hset(
        key, "n:second", f'{{"id": "second", "type": "test.noop", "attempts": 1, "error": {failed_before}}}'
    )
    await queue.redis.hset(key, "d", queue.max_deliveries)  # earlier workers died running it

    await start_worker(catalog)
    meta = await settled(queue, execution_id)

    assert meta["error"]["code"] == "poison" and meta["error"]["node"] == "second"
    [letter] = await queue.dead_letters()
    assert letter["node"] == "second"
    assert "while running node second" in letter["message"] and "[test-missing] gone" in letter["message"]
