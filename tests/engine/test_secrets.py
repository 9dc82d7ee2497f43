"""Secrets: `secrets.NAME` in templates, from FLOWCHAT_SECRET_* and FLOWCHAT_SECRETS_FILE, masked everywhere."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis
from support import ROOT, TEST_PLUGINS, daemon_env, enqueue, run_cli, settled

import flowchat
from flowchat.catalog import Catalog
from flowchat.registry import load_registry
from flowchat.secrets import Secrets, read_secrets_file
from flowchat.services import open_services
from flowchat.settings import Settings, SettingsError

# --- where values come from ------------------------------------------------------------


def test_secrets_come_from_the_environment_over_the_secrets_file(tmp_path):
    file = tmp_path / "secrets.env"
    file.write_text("# the CRM\nCRM_TOKEN = from-file\n\nSHARED=file-value\nWITH_EQUALS=a=b\n")
    environ = {"FLOWCHAT_SECRET_SHARED": "env-value", "FLOWCHAT_SECRET_ONLY_ENV": "x", "OTHER": "y"}

    secrets = Secrets.from_settings(Settings.from_env({**environ, "FLOWCHAT_SECRETS_FILE": str(file)}))

    assert secrets.names() == {"CRM_TOKEN", "SHARED", "ONLY_ENV", "WITH_EQUALS"}
    assert secrets.get("SHARED") == "env-value"
    assert secrets.get("CRM_TOKEN") == "from-file"
    assert secrets.get("WITH_EQUALS") == "a=b"


def test_a_malformed_secrets_file_names_the_line_but_never_a_value(tmp_path):
    file = tmp_path / "secrets.env"
    file.write_text("GOOD=fine\nhunter2-the-password\n")

    with pytest.raises(SettingsError) as caught:
        read_secrets_file(file)

    assert f"{file}:2" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    result = run_cli("validate", str(ROOT / "flows"), env={**daemon_env("unused"), "FLOWCHAT_SECRETS_FILE": str(file)})
    assert result.returncode == 2
    assert "[settings-invalid]" in result.stderr and "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


def test_masking_replaces_every_value_in_nested_outputs_longest_first():
    secrets = Secrets({"A": "abc123", "B": "abc123-longer", "EMPTY": ""})

    masked = secrets.mask({"x": ["Bearer abc123-longer", {"abc123": 1}], "n": 5, "t": ("abc123",)})

    assert masked == {"x": ["Bearer ***", {"***": 1}], "n": 5, "t": ["***"]}
    assert Secrets().mask(out := {"a": "b"}) is out  # no secrets: nothing is copied


# --- templates --------------------------------------------------------------------------

FLOW = """\
flow: secret_call
trigger: {type: webhook}
nodes:
  - id: call
    type: http.request
    with:
      method: POST
      url: "{{ trigger.base }}/echo"
      headers: {Authorization: "Bearer {{ secrets.API_TOKEN }}", X-User: "{{ secrets['CRM_USER'] }}"}
      json: {hello: world}
  - id: denied
    needs: []
    type: http.request
    retry: {max_attempts: 1}
    with:
      url: "{{ trigger.base }}/deny?token={{ secrets.API_TOKEN }}"
"""


@pytest.fixture
async def echo_server() -> Any:
    """Echoes the Authorization header back in its body and headers; /deny answers 400 quoting the URL."""
    seen: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        body = {"authorization": request.headers.get("Authorization"), "user": request.headers.get("X-User")}
        return web.json_response(body, headers={"X-Echo": request.headers.get("Authorization", "")})

    async def deny(request: web.Request) -> web.Response:
        return web.Response(status=400, text=f"bad token in {request.path_qs}")

    app = web.Application()
    app.add_routes([web.post("/echo", echo), web.get("/deny", deny)])
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}", seen
    await runner.cleanup()


def test_the_loader_knows_which_secrets_a_flow_reads(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW)
    flow = flowchat.load_flow(path, load_registry(TEST_PLUGINS, entry_points=False))
    assert flow.secrets == {"API_TOKEN", "CRM_USER"}


def test_validate_warns_about_an_unset_secret_by_name(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW)

    result = run_cli("validate", str(path), env={**daemon_env("unused"), "FLOWCHAT_SECRET_CRM_USER": "u-1"})

    assert result.returncode == 0, result.stderr  # a warning, not a problem
    assert "[secret-missing]" in result.stderr and "secrets.API_TOKEN" in result.stderr
    assert "CRM_USER" not in result.stderr


async def test_an_unset_secret_fails_its_node_at_run_time_naming_it(tmp_path, echo_server):
    base, seen = echo_server
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW)
    flow = flowchat.load_flow(path, load_registry(TEST_PLUGINS, entry_points=False))

    async with open_services(Settings.from_env({"FLOWCHAT_SECRET_CRM_USER": "u-1"})) as services:
        execution = await flowchat.Runner(services).run(flow, flowchat.Execution.new(flow, {"base": base}))

    error = execution.nodes["call"].error
    assert error is not None
    assert error["code"] == "secret-missing"
    assert "secrets.API_TOKEN is not set" in error["message"]
    assert seen == []  # the request was never sent


# --- end to end: a real worker process -------------------------------------------------


async def redis_contents(redis: Redis) -> bytes:
    """Every key and value in Redis, whatever its type, as one blob to search."""
    parts: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        parts.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            parts.append(await redis.get(key) or b"")
        elif kind == "hash":
            for field, value in (await redis.hgetall(key)).items():  # type: ignore[misc]
                parts += [field, value]
        elif kind == "list":
            parts += await redis.lrange(key, 0, -1)  # type: ignore[misc]
        elif kind == "set":
            parts += list(await redis.smembers(key))  # type: ignore[misc]
        elif kind == "zset":
            parts += [member for member, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for entry_id, fields in await redis.xrange(key):
                parts.append(entry_id)
                for field, value in fields.items():
                    parts += [field, value]
        else:
            raise AssertionError(f"unexpected key type {kind} for {key!r}")
    return b"\n".join(parts)


async def test_a_secret_in_a_header_reaches_the_server_and_nowhere_else(
    queue, redis, redis_url, flows_dir, processes, tmp_path, echo_server
):
    base, seen = echo_server
    token, user = f"tok-{uuid.uuid4().hex}", f"u{uuid.uuid4().hex[:6]}"
    secrets_file = tmp_path / "secrets.env"
    secrets_file.write_text(f"API_TOKEN={token}\n")
    (flows_dir / "secret_call.yaml").write_text(FLOW)
    env = daemon_env(redis_url, FLOWCHAT_SECRETS_FILE=str(secrets_file), FLOWCHAT_SECRET_CRM_USER=user)
    worker = processes.start("worker", "--flows", str(flows_dir), env=env)
    catalog = Catalog(flows_dir, load_registry(TEST_PLUGINS))
    catalog.reload()

    execution_id = await enqueue(queue, catalog, "secret_call", {"base": base})
    outcome = await settled(queue, execution_id)

    assert seen == [f"Bearer {token}"]  # it reached the server, once
    assert outcome["status"] == "failed"  # `denied` answered 400
    stored = await queue.get(execution_id)
    assert stored is not None
    call = stored[1]["call"]
    assert call["output"]["json"] == {"authorization": "Bearer ***", "user": "***"}
    assert call["output"]["headers"]["x-echo"] == "Bearer ***"
    assert "token=***" in stored[1]["denied"]["error"]["message"]

    blob = await redis_contents(redis)
    assert b"Bearer ***" in blob  # the scan does see node outputs
    assert token.encode() not in blob and user.encode() not in blob

    shown = run_cli("executions", "show", execution_id, env=env)
    shown_json = run_cli("executions", "show", execution_id, "--json", env=env)
    dead = run_cli("dlq", "list", env=env)
    for result in (shown, shown_json, dead):
        assert result.returncode == 0, result.stderr
        assert token not in result.stdout + result.stderr and user not in result.stdout + result.stderr
    assert "***" in shown.stdout and json.loads(shown_json.stdout)["status"] == "failed"

    worker.terminate()
    assert worker.wait(15) == 0
    log = processes.log_of(worker)
    assert "token=***" in log  # the failure was logged, masked
    assert token not in log and user not in log


def test_flowchat_run_prints_no_secret(tmp_path, echo_server_sync):
    base = echo_server_sync
    token = f"tok-{uuid.uuid4().hex}"
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW.replace("{{ trigger.base }}", base))
    env = {**daemon_env("unused"), "FLOWCHAT_SECRET_API_TOKEN": token, "FLOWCHAT_SECRET_CRM_USER": "crm-user-1"}

    for args in (("run", str(path)), ("run", str(path), "--json")):
        result = run_cli(*args, env=env)
        assert result.returncode == 1  # `denied` fails
        assert "Bearer ***" in result.stdout
        assert token not in result.stdout + result.stderr and "crm-user-1" not in result.stdout + result.stderr


@pytest.fixture
def echo_server_sync(tmp_path: Path) -> Any:
    """The echo server in a thread of its own, for tests that block on a subprocess."""
    import asyncio
    import threading

    ready: dict[str, Any] = {}
    started = threading.Event()

    def serve() -> None:
        loop = asyncio.new_event_loop()

        async def start() -> web.AppRunner:
            async def echo(request: web.Request) -> web.Response:
                auth = request.headers.get("Authorization", "")
                return web.json_response({"authorization": auth}, headers={"X-Echo": auth})

            async def deny(request: web.Request) -> web.Response:
                return web.Response(status=400, text=f"bad token in {request.path_qs}")

            app = web.Application()
            app.add_routes([web.post("/echo", echo), web.get("/deny", deny)])
            runner = web.AppRunner(app, shutdown_timeout=0.1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return runner

        runner = loop.run_until_complete(start())
        ready["base"] = "http://{}:{}".format(*runner.addresses[0][:2])
        ready["loop"], ready["runner"] = loop, runner
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    yield ready["base"]
    ready["loop"].call_soon_threadsafe(ready["loop"].stop)
    thread.join(10)
