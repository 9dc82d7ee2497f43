"""`flowchat serve` as a user runs it: embedded Redis, hot reload, health."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from support import ROOT, daemon_env, flow_yaml, run_cli, wait_for

from flowchat.catalog import Catalog
from flowchat.redis_server import free_port


def hello_flow(name: str, path: str, version: int) -> str:
    """A flow on webhook ``path`` whose one node outputs ``version`` (edit it to make a new version)."""
    node = {"id": "hello", "type": "set", "with": {"values": {"version": version}}}
    return flow_yaml(name, [node], trigger={"type": "webhook", "path": path})


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = daemon_env("unused")
    del env["FLOWCHAT_REDIS_URL"]
    env["FLOWCHAT_DATA_DIR"] = str(data_dir)
    return env


async def post(port: int, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/hooks/{path}", json=body) as response,
    ):
        return response.status, json.loads(await response.text())


async def test_embedded_redis_keeps_accepted_executions_across_a_restart(flows_dir, processes, tmp_path):
    (flows_dir / "kept.yaml").write_text(hello_flow(name="kept", path="kept", version=1))
    data_dir, port = tmp_path / "data", free_port()
    env = embedded_env(data_dir)
    ingress_only = processes.start("serve", "--flows", str(flows_dir), "--port", str(port), "--no-workers", env=env)

    status, body = await post(port, "kept", {"who": "ada"})
    assert status == 202
    execution_id = str(body["execution_id"])
    shown = run_cli("executions", "show", execution_id, "--json", env=env)
    assert json.loads(shown.stdout)["status"] == "queued"
    ingress_only.terminate()
    assert ingress_only.wait(15) == 0
    assert (data_dir / "appendonlydir").is_dir() or (data_dir / "appendonly.aof").exists()

    processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=env)

    def succeeded() -> bool:
        result = run_cli("executions", "show", execution_id, "--json", env=env)
        return result.returncode == 0 and json.loads(result.stdout)["status"] == "succeeded"

    await wait_for(succeeded, timeout=30, interval=0.3)


async def test_flows_reload_without_a_restart_and_a_broken_edit_keeps_the_previous_version(
    redis_url, flows_dir, processes, tmp_path
):
    port = free_port()
    (flows_dir / "first.yaml").write_text(hello_flow(name="first", path="first", version=1))
    serve = processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=daemon_env(redis_url))

    async def answers(path: str, expected: int) -> bool:
        return (await post(port, path, {}))[0] == expected

    # added
    (flows_dir / "second.yaml").write_text(hello_flow(name="second", path="second", version=1))
    await wait_for(lambda: answers("second", 202))
    # edited: the webhook moves to a new path
    (flows_dir / "second.yaml").write_text(hello_flow(name="second", path="moved", version=2))
    await wait_for(lambda: answers("moved", 202))
    assert (await post(port, "second", {}))[0] == 404
    # a broken edit is rejected and the previous version keeps serving
    (flows_dir / "second.yaml").write_text("flow: second\ntrigger: {type: webhook, path: broken\nnodes: [\n")
    await wait_for(lambda: "second.yaml" in processes.log_of(serve) and "rejected" in processes.log_of(serve))
    assert (await post(port, "moved", {}))[0] == 202
    assert "yaml-syntax" in processes.log_of(serve)
    # removed
    (flows_dir / "second.yaml").unlink()
    await wait_for(lambda: answers("moved", 404))
    assert (await post(port, "first", {}))[0] == 202


def test_catalog_reload_reports_what_changed(flows_dir, registry):
    catalog = Catalog(flows_dir, registry)
    assert catalog.reload() is False
    (flows_dir / "a.yaml").write_text(hello_flow(name="a", path="a", version=1))
    assert catalog.reload() is True
    assert catalog.reload() is False  # nothing new
    version = catalog.get("a").version  # type: ignore[union-attr]
    (flows_dir / "a.yaml").write_text(hello_flow(name="a", path="a", version=2) + "\n")
    assert catalog.reload() is True
    assert catalog.get("a").version != version  # type: ignore[union-attr]
    (flows_dir / "b.yaml").write_text(hello_flow(name="a", path="b", version=1))
    assert catalog.reload() is False
    assert catalog.problems[flows_dir / "b.yaml"][0].code == "flow-duplicate-name"


def test_two_flows_cannot_share_a_webhook_path(flows_dir, registry):
    (flows_dir / "a.yaml").write_text(hello_flow(name="a", path="shared", version=1))
    (flows_dir / "b.yaml").write_text(hello_flow(name="b", path="shared", version=1))
    catalog = Catalog(flows_dir, registry)
    catalog.reload()

    assert set(catalog.flows) == {"a"}
    [problem] = catalog.problems[flows_dir / "b.yaml"]
    assert problem.code == "webhook-path-taken" and "/hooks/shared" in problem.message
    assert catalog.webhook("shared") is catalog.get("a")


def test_validate_reports_a_webhook_path_used_twice(flows_dir):
    (flows_dir / "a.yaml").write_text(hello_flow(name="a", path="shared", version=1))
    (flows_dir / "b.yaml").write_text(hello_flow(name="b", path="shared", version=1))

    result = run_cli("validate", str(flows_dir), env=daemon_env("unused"))

    assert result.returncode == 1
    assert f"{flows_dir / 'b.yaml'}:1:1: [webhook-path-taken]" in result.stderr


async def test_the_readme_quickstart_works_against_the_shipped_flows(redis_url, processes):
    import re

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"curl -s -X POST http://127\.0\.0\.1:8080/hooks/(\S+) \\\n(.*?)\n#", readme, re.S)
    assert command, "the README's quickstart curl moved"
    path, rest = command.group(1), command.group(2)
    token = re.search(r"Authorization: Bearer ([\w-]+)", rest).group(1)  # type: ignore[union-attr]
    body = json.loads(re.search(r"-d '(.*?)'", rest).group(1))  # type: ignore[union-attr]
    assert f"FLOWCHAT_WEBHOOK_TOKEN={token} flowchat serve" in readme
    port = free_port()
    env = daemon_env(redis_url, FLOWCHAT_WEBHOOK_TOKEN=token)
    env["FLOWCHAT_PLUGINS"] = str(ROOT / "plugins")
    processes.start("serve", "--flows", str(ROOT / "flows"), "--port", str(port), env=env)

    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "lead-1"}
        async with http.post(f"http://127.0.0.1:{port}/hooks/{path}", json=body, headers=headers) as response:
            assert response.status == 202
            execution_id = (await response.json())["execution_id"]

    def succeeded() -> bool:
        result = run_cli("executions", "show", execution_id, "--json", env=env)
        return result.returncode == 0 and json.loads(result.stdout)["status"] == "succeeded"

    await wait_for(succeeded, timeout=30, interval=0.2)


def test_long_lived_processes_run_on_uvloop_where_it_is_installed() -> None:
    from flowchat.daemon import run

    seen: list[str] = []

    async def main() -> int:
        seen.append(type(asyncio.get_running_loop()).__module__)
        return 7

    assert run(main()) == 7
    assert seen == ["uvloop"]
