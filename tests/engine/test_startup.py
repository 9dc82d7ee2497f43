"""Clear failures and operator-facing logs, as a user meets them: real processes, one line each, exit codes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from pathlib import Path

import aiohttp
import redis as sync_redis
from support import TEST_PLUGINS, daemon_env, run_cli, wait_for, write_flow

from flowchat.connections import describe
from flowchat.redis_server import free_port
from flowchat.settings import Settings

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 ")


def hook_flow(flows_dir: Path, name: str = "hello", **auth: str) -> None:
    write_flow(flows_dir, name, "- {id: a, type: test.noop}", trigger={"type": "webhook", "path": name, **auth})


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


def test_version():
    result = run_cli("--version", env=daemon_env("unused"))
    assert result.returncode == 0 and re.fullmatch(r"flowchat \d+\.\d+\.\d+\S*\n", result.stdout)


def test_a_port_in_use_is_one_line_and_exit_1(redis_url, flows_dir):
    hook_flow(flows_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--flows", str(flows_dir), "--port", str(port), env=daemon_env(redis_url))
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if "error" in line]
    assert line.startswith("flowchat: error: [port-in-use] cannot listen on 127.0.0.1:")
    assert "--port" in line and "Traceback" not in result.stderr


def test_a_missing_flows_folder_is_one_line_and_exit_1(redis_url, tmp_path):
    for command in ("serve", "worker"):
        result = run_cli(command, "--flows", str(tmp_path / "nowhere"), env=daemon_env(redis_url))
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"flowchat: error: [flows-folder-missing] flows folder {tmp_path / 'nowhere'} does not exist; "
            "create it or pass --flows DIR"
        )


def test_operator_commands_never_start_an_empty_embedded_redis(tmp_path):
    env = daemon_env("unused")
    del env["FLOWCHAT_REDIS_URL"]
    for args in (("queue", "stats"), ("dlq", "list"), ("executions", "list")):
        result = run_cli(*args, env=env, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.startswith("flowchat: error: [no-redis] no FLOWCHAT_REDIS_URL")
        assert str(tmp_path / ".flowchat") in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / ".flowchat").exists()


def test_global_options_are_accepted_after_the_command(redis_url, flows_dir):
    hook_flow(flows_dir)
    env = daemon_env(redis_url)
    result = run_cli("nodes", "--json", "--plugins", str(TEST_PLUGINS), "--log-level", "ERROR", env=env)
    assert result.returncode == 0, result.stderr
    assert "test.noop" in {node["type"] for node in json.loads(result.stdout)}
    result = run_cli("validate", str(flows_dir), "--plugins", str(TEST_PLUGINS), "--log-format", "json", env=env)
    assert result.returncode == 0, result.stderr


async def test_unreachable_redis_keeps_http_up_logs_once_and_is_not_ready(flows_dir, processes):
    hook_flow(flows_dir)
    dead = f"redis://127.0.0.1:{free_port()}"
    port = free_port()
    serve = processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=daemon_env(dead))
    assert (await get(port, "/healthz"))[0] == 200
    assert (await get(port, "/readyz"))[0] == 503
    await asyncio.sleep(2.5)  # several backoff rounds of the mover, scheduler and worker
    log = processes.log_of(serve)
    assert log.count("redis unreachable") == 1, log
    assert "Traceback" not in log
    assert (await get(port, "/readyz"))[0] == 503 and serve.poll() is None


async def test_unset_token_env_and_an_evicting_redis_are_warned_at_start(redis_url, flows_dir, processes):
    hook_flow(flows_dir, token_env="FLOWCHAT_TEST_UNSET_TOKEN")
    client = sync_redis.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        serve = processes.start(
            "serve", "--flows", str(flows_dir), "--port", str(free_port()), env=daemon_env(redis_url)
        )
        await wait_for(lambda: "maxmemory-policy" in processes.log_of(serve))
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
    log = processes.log_of(serve)
    assert "flow hello: token_env FLOWCHAT_TEST_UNSET_TOKEN is not set; its webhook answers 503 until it is" in log
    assert "redis maxmemory-policy is allkeys-lru: Redis may evict queued executions" in log
    assert "set maxmemory-policy noeviction" in log


async def test_logs_start_up_access_and_drain_lines(redis_url, flows_dir, processes):
    hook_flow(flows_dir)
    port = free_port()
    env = daemon_env(redis_url)
    serve = processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=env)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/hooks/hello", json={"phone": "+14155550123"}) as response:
            execution_id = (await response.json())["execution_id"]
        async with http.post(f"http://127.0.0.1:{port}/hooks/+14155550123", json={}) as response:
            assert response.status == 404
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(30) == 0
    log = processes.log_of(serve)
    lines = log.splitlines()
    assert all(ISO_UTC.match(line) for line in lines if line and not line.startswith(" ")), log
    assert re.search(
        r"flowchat\.daemon redis redis://127\.0\.0\.1:\d+ \(single\); queue fc; data dir .+; 1 flow\(s\) from .+; send mode outbox",
        log,
    )
    assert re.search(
        rf"flowchat\.access POST /hooks/{{path}} 202 [\d.]+ms execution={execution_id} from 127\.0\.0\.1", log
    )
    assert re.search(r"flowchat\.access POST /hooks/\{path\} 404 [\d.]+ms from", log)
    assert "14155550123" not in log
    assert "SIGTERM received: taking no new work" in log
    assert re.search(r"drain finished in [\d.]+s; exiting with status 0", log)


async def test_json_log_format(redis_url, flows_dir, processes):
    hook_flow(flows_dir)
    port = free_port()
    serve = processes.start(
        "serve", "--flows", str(flows_dir), "--port", str(port), env=daemon_env(redis_url, FLOWCHAT_LOG_FORMAT="json")
    )
    assert (await get(port, "/healthz"))[0] == 200
    serve.send_signal(signal.SIGTERM)
    serve.wait(30)
    records = [json.loads(line) for line in processes.log_of(serve).splitlines() if line.strip()]
    assert all(set(record) >= {"time", "level", "logger", "message"} for record in records)
    assert all(record["time"].endswith("+00:00") for record in records)
    [access] = [record for record in records if record["logger"] == "flowchat.access"]
    assert access["route"] == "/healthz" and access["status"] == 200 and access["method"] == "GET"
    assert isinstance(access["duration_ms"], float)


async def test_a_worker_with_a_port_serves_health_and_metrics(redis_url, flows_dir, processes):
    hook_flow(flows_dir)
    port = free_port()
    worker = processes.start("worker", "--flows", str(flows_dir), "--port", str(port), env=daemon_env(redis_url))
    assert await get(port, "/healthz") == (200, '{"status": "alive"}')
    assert (await get(port, "/readyz"))[0] == 200
    status, text = await get(port, "/metrics")
    assert status == 200 and "flowchat_executions" in text
    assert (await get(port, "/hooks/hello"))[0] == 404  # health only: no ingress on a worker
    assert worker.poll() is None


def test_the_redis_is_named_without_its_password():
    settings = Settings.from_env({"FLOWCHAT_REDIS_URL": "rediss://app:s3cretpass@redis.internal:6380/0"})
    assert str(describe(settings, object())) == "rediss://redis.internal:6380 (single)"


async def test_sighup_reloads_flows_instead_of_killing_the_daemon(redis_url, flows_dir, processes):
    hook_flow(flows_dir)
    serve = processes.start("serve", "--flows", str(flows_dir), "--port", str(free_port()), env=daemon_env(redis_url))
    hook_flow(flows_dir, "second")
    serve.send_signal(signal.SIGHUP)
    await wait_for(lambda: "SIGHUP received: flows reloaded" in processes.log_of(serve))
    assert serve.poll() is None
    assert re.search(
        r"SIGHUP received: flows reloaded from .+ \((changed|no change)\); 2 flow\(s\)", processes.log_of(serve)
    )


async def test_metrics_include_process_python_and_failure_counters(redis_url, flows_dir, processes):
    hook_flow(flows_dir)
    port = free_port()
    processes.start("worker", "--flows", str(flows_dir), "--port", str(port), env=daemon_env(redis_url))
    _, text = await get(port, "/metrics")
    for name in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "python_gc_collections_total",
        "flowchat_worker_task_crashes_total 0.0",
        "flowchat_redis_errors_total",
        "flowchat_redis_reconnects_total",
    ):
        assert name in text, name
