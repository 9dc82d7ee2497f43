"""Requests written to hurt: each gets a 4xx, harms no other request, and stores nothing."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from support import ROOT, daemon_env, wait_for, write_flow

from flowchat.ingress import create_app
from flowchat.keys import Keys
from flowchat.metrics import Metrics
from flowchat.queue import Queue
from flowchat.redis_server import RedisServer, free_port

NOOP = "- {id: a, type: test.noop}"


def write_flows(folder: Path) -> None:
    write_flow(folder, "open", NOOP)
    write_flow(folder, "signed", NOOP, trigger={"type": "webhook", "secret_env": "HOOK_SECRET"})
    write_flow(folder, "token", NOOP, trigger={"type": "webhook", "token_env": "HOOK_TOKEN"})


@pytest.fixture
async def daemon(redis_url: str, flows_dir: Path, processes) -> tuple[int, object]:
    write_flows(flows_dir)
    port = free_port()
    env = daemon_env(redis_url, HOOK_SECRET="hook-secret", HOOK_TOKEN="hook-token", FLOWCHAT_HEADER_TIMEOUT="1")
    serve = processes.start("serve", "--flows", str(flows_dir), "--port", str(port), "--no-workers", env=env)
    return port, serve


async def raw_request(port: int, head: bytes, body: bytes = b"") -> int:
    """Send bytes as they are (headers aiohttp's client would refuse) and return the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1])
    finally:
        writer.close()


def post_head(path: str, *headers: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        f"POST /hooks/{path} HTTP/1.1\r\nHost: x\r\n".encode()
        + b"Content-Type: "
        + content_type
        + b"\r\n"
        + b"".join(header + b"\r\n" for header in headers)
    )


async def stored(queue: Queue) -> int:
    return await queue.total()


async def metrics_text(port: int) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        return await response.text()


async def test_a_bad_header_among_concurrent_requests_harms_none_of_them(daemon, queue: Queue) -> None:
    port, _ = daemon
    before = await stored(queue)

    async def legit(http: aiohttp.ClientSession, index: int) -> int:
        async with http.post(f"http://127.0.0.1:{port}/hooks/open", json={"i": index}) as response:
            return response.status

    async with aiohttp.ClientSession() as http:
        bad = [raw_request(port, post_head("open", b"Idempotency-Key: k\xff\xfe"), b"{}") for _ in range(5)]
        results = await asyncio.gather(*(legit(http, i) for i in range(80)), *bad)

    assert results[:80] == [202] * 80
    assert results[80:] == [400] * 5
    assert await stored(queue) == before + 80
    assert 'status="5' not in await metrics_text(port)


BAD_HEADERS = [
    ("signed", b"X-FlowChat-Signature: sha256=\xff\xfe", 401),
    ("token", b"Authorization: Bearer \xff\xfe", 401),
    ("open", b"Idempotency-Key: " + b"k" * 300, 400),
]


async def test_bad_credential_bytes_are_a_4xx(daemon, queue: Queue) -> None:
    port, _ = daemon
    before = await stored(queue)
    for path, header, status in BAD_HEADERS:
        assert await raw_request(port, post_head(path, header), b"{}") == status, header
    assert await stored(queue) == before


BAD_PAYLOADS = [
    (b'{"n": 18446744073709551616}', b"application/json", 400, "$.n"),
    (b'{"n": -9223372036854775809}', b"application/json", 400, "$.n"),
    (b'{"a": ' * 100 + b"1" + b"}" * 100, b"application/json", 400, "$"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, b"application/json", 400, "$"),
    (b'{"s": "\\ud800"}', b"application/json", 400, "$.s"),
    (b'{"\\udfff": 1}', b"application/json", 400, "$"),
    (b'{"n": NaN}', b"application/json", 400, "$"),
    (b'{"n": Infinity}', b"application/json", 400, "$"),
    (b'{"n": 1}', b"text/plain", 415, "$"),
    (b"[1, 2]", b"application/json", 400, "$"),
    (b"{", b"application/json", 400, "$"),
    (b"\xff\xfe", b"application/json", 400, "$"),
]


async def test_unstorable_payloads_are_a_4xx_with_their_path(daemon, queue: Queue) -> None:
    port, _ = daemon
    before = await stored(queue)
    async with aiohttp.ClientSession() as http:
        for body, content_type, status, where in BAD_PAYLOADS:
            headers = {"Content-Type": content_type.decode()}
            async with http.post(f"http://127.0.0.1:{port}/hooks/open", data=body, headers=headers) as response:
                answer = json.loads(await response.text())
                assert response.status == status, (body[:40], answer)
            assert answer["errors"][0]["path"].startswith(where), (body[:40], answer)
    assert await stored(queue) == before


async def test_repeated_form_keys_become_lists(daemon, queue: Queue) -> None:
    port, _ = daemon
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{port}/hooks/open",
            data="tag=a&tag=b&name=ada",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as response,
    ):
        assert response.status == 202
        execution_id = (await response.json())["execution_id"]
    execution = await queue.get(execution_id)
    assert execution is not None
    assert execution[0]["trigger"] == {"tag": ["a", "b"], "name": "ada"}


async def test_half_open_connections_cannot_exhaust_the_daemon(redis_url, flows_dir, tmp_path) -> None:
    write_flows(flows_dir)
    port = free_port()
    env = daemon_env(redis_url, FLOWCHAT_HEADER_TIMEOUT="1")

    def low_descriptor_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flowchat.cli", "serve", "--flows", str(flows_dir), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        preexec_fn=low_descriptor_limit,
    )
    try:
        assert serve.stdout is not None and "listening" in serve.stdout.readline().decode()
        idle = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /hooks/open HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            idle.append(sock)

        async def healthy() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as response,
                ):
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_for(healthy, timeout=10, interval=0.1)
        write_flow(flows_dir, "later", NOOP)

        async def later_served() -> bool:
            async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{port}/hooks/later", json={}) as r:
                return r.status == 202

        await wait_for(later_served, timeout=10, interval=0.2)
        assert serve.poll() is None
        for sock in idle:
            sock.close()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(20)
    assert serve.returncode == 0


async def test_an_unexpected_error_is_a_counted_500(flows_dir: Path, catalog_factory, queue: Queue) -> None:
    write_flows(flows_dir)
    catalog = catalog_factory(flows_dir)

    def broken(path: str) -> None:
        raise ZeroDivisionError("a bug")

    catalog.webhook = broken  # type: ignore[method-assign]
    metrics = Metrics()
    client = TestClient(TestServer(create_app(queue, catalog, metrics)))
    await client.start_server()
    try:
        response = await client.post("/hooks/open", json={})
        assert response.status == 500
        assert await response.json() == {"error": "internal error"}
    finally:
        await client.close()
    assert b'flowchat_ingress_requests_total{route="/hooks/{path}",status="500"} 1.0' in metrics.render()


# --- /readyz -------------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path):
    server = RedisServer(tmp_path / "readyz-redis").start()
    yield server
    if server.process is not None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop(force=True)


async def readyz(port: int) -> tuple[int, float, dict[str, object]]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, time.monotonic() - started, json.loads(await response.text())


async def test_readyz_tells_the_truth_about_redis(own_redis: RedisServer, flows_dir: Path, processes) -> None:
    write_flows(flows_dir)
    port = free_port()
    env = daemon_env(own_redis.url)
    processes.start("serve", "--flows", str(flows_dir), "--port", str(port), "--no-workers", env=env)
    from redis.asyncio import Redis

    admin = Redis.from_url(own_redis.url)
    try:
        assert (await readyz(port))[0] == 200
        # out of memory: writes refused
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        status, _, body = await readyz(port)
        assert status == 503 and "maxmemory" in json.dumps(body), body
        await admin.config_set("maxmemory", "0")
        assert (await readyz(port))[0] == 200
        # a read-only replica
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        status, _, body = await readyz(port)
        assert status == 503 and "read only" in json.dumps(body), body
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        assert (await readyz(port))[0] == 200
        # paused: answered 503 within the timeout, not hung
        assert own_redis.process is not None
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        status, took, body = await readyz(port)
        os.kill(own_redis.process.pid, signal.SIGCONT)
        assert status == 503 and took < 3, (took, body)
    finally:
        await admin.aclose()


def test_keys_has_a_readyz_probe() -> None:
    assert Keys("fc").ready_probe.startswith("{fc}")


async def test_a_command_that_cannot_be_packed_fails_alone_in_its_batch(redis) -> None:
    from flowchat.pipeliner import Pipeliner

    pipeliner = Pipeliner(redis)
    futures = [pipeliner.execute("SET", f"fc-test:{index}", "ok") for index in range(20)]
    culprit = pipeliner.execute("SET", "fc-test:bad", "\ud800")  # a lone surrogate: hiredis cannot pack it
    results = await asyncio.gather(*futures, culprit, return_exceptions=True)

    assert results[:20] == [b"OK"] * 20
    assert isinstance(results[20], UnicodeEncodeError | ValueError | TypeError)
    assert await redis.get("fc-test:bad") is None
