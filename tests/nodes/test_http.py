"""``http.request`` against local aiohttp servers: bodies, headers, retries, timeouts."""

import asyncio
import socket
import time

from aiohttp import web

FETCH = """
- id: fetch
  type: http.request
  retry: {max_attempts: 3, backoff: 10ms}
  with:
    method: "{{ trigger.method | default('GET') }}"
    url: "{{ trigger.url }}"
"""


async def test_get_parses_a_json_response(run_flow, http_server):
    async def contact(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "tags": ["vip"]})

    base = await http_server([web.get("/contacts/{id}", contact)])

    execution = await run_flow(FETCH, {"url": f"{base}/contacts/42"})

    assert execution.status == "succeeded"
    output = execution.nodes["fetch"].output
    assert output["status"] == 200
    assert output["json"] == {"id": "42", "tags": ["vip"]}
    assert output["headers"]["content-type"].startswith("application/json")  # header names are lower-case


async def test_a_text_response_has_text_and_no_json(run_flow, http_server):
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    base = await http_server([web.get("/hello", hello)])

    output = (await run_flow(FETCH, {"url": f"{base}/hello"})).nodes["fetch"].output

    assert output["text"] == "hello"
    assert "json" not in output


async def test_post_sends_a_rendered_json_body_and_headers(run_flow, http_server):
    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "body": await request.json(),
                "content_type": request.content_type,
                "api_key": request.headers.get("X-Api-Key"),
            },
            status=201,
        )

    base = await http_server([web.post("/leads", echo)])
    nodes = """
    - id: create
      type: http.request
      with:
        method: POST
        url: "{{ trigger.url }}"
        headers: {X-Api-Key: "key-{{ trigger.account }}"}
        json: {name: "{{ trigger.name }}", score: "{{ trigger.score * 2 }}", tags: ["a", "b"]}
    """

    execution = await run_flow(nodes, {"url": f"{base}/leads", "account": 7, "name": "Ann", "score": 10})

    output = execution.nodes["create"].output
    assert output["status"] == 201
    assert output["json"] == {
        "body": {"name": "Ann", "score": 20, "tags": ["a", "b"]},
        "content_type": "application/json",
        "api_key": "key-7",
    }


async def test_a_raw_text_body_is_sent_as_is(run_flow, http_server):
    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=(await request.text()).upper())

    base = await http_server([web.put("/note", echo)])
    nodes = """
    - id: note
      type: http.request
      with: {method: PUT, url: "{{ trigger.url }}", body: "hi {{ trigger.name }}"}
    """

    execution = await run_flow(nodes, {"url": f"{base}/note", "name": "Ann"})

    assert execution.nodes["note"].output["text"] == "HI ANN"


async def test_404_fails_at_once_without_retrying(run_flow, http_server):
    calls = 0

    async def missing(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=404, text="no such contact")

    base = await http_server([web.get("/contacts/1", missing)])

    execution = await run_flow(FETCH, {"url": f"{base}/contacts/1"})

    assert execution.status == "failed"
    assert execution.error["code"] == "http-404"
    assert "no such contact" in execution.error["message"]
    assert execution.error["retryable"] is False
    assert execution.nodes["fetch"].attempts == 1
    assert calls == 1


async def test_5xx_and_429_are_retried_until_the_server_recovers(run_flow, http_server):
    calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        statuses = {1: 503, 2: 429}
        if calls in statuses:
            return web.Response(status=statuses[calls])
        return web.json_response({"ok": True})

    base = await http_server([web.get("/flaky", flaky)])

    execution = await run_flow(FETCH, {"url": f"{base}/flaky"})

    assert execution.status == "succeeded"
    assert calls == 3
    assert execution.nodes["fetch"].attempts == 3
    assert execution.nodes["fetch"].output["json"] == {"ok": True}


async def test_5xx_every_time_exhausts_the_attempts(run_flow, http_server):
    calls = 0

    async def down(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=502)

    base = await http_server([web.get("/down", down)])

    execution = await run_flow(FETCH, {"url": f"{base}/down"})

    assert execution.status == "failed"
    assert execution.error["code"] == "http-502"
    assert calls == execution.nodes["fetch"].attempts == 3


async def test_retry_after_is_honoured(run_flow, http_server):
    seen: list[float] = []

    async def busy(request: web.Request) -> web.Response:
        seen.append(time.perf_counter())
        if len(seen) == 1:
            return web.Response(status=503, headers={"Retry-After": "0.3"})
        return web.json_response({"ok": True})

    base = await http_server([web.get("/busy", busy)])

    execution = await run_flow(FETCH, {"url": f"{base}/busy"})  # backoff alone would be 10ms

    assert execution.status == "succeeded"
    assert len(seen) == 2
    assert seen[1] - seen[0] >= 0.3


async def test_connection_refused_is_a_retryable_connection_error(run_flow):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    execution = await run_flow(FETCH, {"url": f"http://127.0.0.1:{port}/"})

    assert execution.status == "failed"
    assert execution.error["code"] == "http-connection"
    assert execution.error["retryable"] is True
    assert f"127.0.0.1:{port}" in execution.error["message"]
    assert execution.nodes["fetch"].attempts == 3


async def test_a_slow_server_times_out_per_request(run_flow, http_server):
    release = asyncio.Event()
    calls = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await asyncio.wait_for(release.wait(), 5)
        return web.Response(text="late")

    base = await http_server([web.get("/slow", slow)])
    nodes = """
    - id: fetch
      type: http.request
      retry: {max_attempts: 2, backoff: 10ms}
      with: {url: "{{ trigger.url }}", timeout: 100ms}
    """

    started = time.perf_counter()
    execution = await run_flow(nodes, {"url": f"{base}/slow"})
    elapsed = time.perf_counter() - started
    release.set()

    assert execution.status == "failed"
    assert execution.error["code"] == "http-connection"
    assert "Timeout" in execution.error["message"]
    assert calls == execution.nodes["fetch"].attempts == 2
    assert 0.2 <= elapsed < 2


async def test_a_relative_url_is_refused_once_rendered(run_flow):
    execution = await run_flow(FETCH, {"url": "/contacts/1"})

    assert execution.status == "failed"
    assert execution.error["code"] == "node-config-invalid"
    assert "url" in execution.error["message"]
    assert execution.nodes["fetch"].attempts == 1


async def test_a_response_over_max_response_fails_instead_of_filling_memory(run_flow, http_server):
    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000)

    base = await http_server([web.get("/huge", huge)])
    execution = await run_flow(
        "- {id: fetch, type: http.request, with: {url: '{{ trigger.url }}', max_response: 1000}}",
        {"url": f"{base}/huge"},
    )

    assert execution.status == "failed"
    assert execution.error["code"] == "http-response-too-large"
