"""examples/deploy: the compose services run as local processes and come up healthy; units verify; dashboard names exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from support import ROOT, daemon_env, wait_for

from flowchat.metrics import Metrics
from flowchat.redis_server import free_port

DEPLOY = ROOT / "examples" / "deploy"


def compose() -> dict:
    return json.loads((DEPLOY / "compose.json").read_text())


def local_command(command: list[str], port: int) -> list[str]:
    """A compose command as it runs here: the repo's flows, loopback, a free port."""
    assert command[0] == "flowchat"
    args = list(command[1:])
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--flows") + 1] = str(ROOT / "flows")
    return args


async def test_compose_services_come_up_healthy_as_local_processes(redis_url, queue, processes):
    services = compose()["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    flowchat = {name: service for name, service in services.items() if service.get("command", [""])[0] == "flowchat"}
    assert sorted(flowchat) == ["serve", "worker-1", "worker-2"]
    assert "--no-workers" in flowchat["serve"]["command"]
    ports = {}
    for name, service in flowchat.items():
        env = daemon_env(redis_url, **{k: str(v) for k, v in service["environment"].items()})
        env["FLOWCHAT_REDIS_URL"] = redis_url  # the compose Redis is this test's Redis
        env["FLOWCHAT_PLUGINS"] = str(ROOT / "plugins")
        ports[name] = free_port()
        processes.start(*local_command(service["command"], ports[name]), env=env)

    async def healthy(port: int) -> bool:
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/readyz"):
                async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                    if response.status != 200:
                        return False
        return True

    for port in ports.values():
        await wait_for(lambda port=port: healthy(port), timeout=30)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{ports['serve']}/hooks/leads",
            json={"phone": "+14155550123", "name": "ada lovelace", "interests": ["crm"]},
            headers={"Authorization": f"Bearer {flowchat['serve']['environment']['FLOWCHAT_WEBHOOK_TOKEN']}"},
        ) as response:
            assert response.status == 202, await response.text()
            execution_id = (await response.json())["execution_id"]

    async def succeeded() -> bool:
        stored = await queue.get(execution_id)
        return stored is not None and stored[0]["status"] == "succeeded"

    await wait_for(succeeded, timeout=30)  # a worker service ran it


def test_the_dockerfile_runs_as_non_root_with_a_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER flowchat$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert 'CMD ["flowchat", "serve"' in text
    assert "pip install --no-cache-dir ." in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_units_verify(tmp_path):
    flowchat = Path(sys.executable).parent / "flowchat"
    for unit, name in (
        ("flowchat-serve.service", "flowchat-serve.service"),
        ("flowchat-worker@.service", "flowchat-worker@1.service"),
    ):
        text = (DEPLOY / unit).read_text().replace("/opt/flowchat/bin/flowchat", str(flowchat))
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text and "Restart=on-failure" in text
        (tmp_path / name).write_text(text)
        result = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=60
        )
        problems = [line for line in result.stderr.splitlines() if name in line or "flowchat" in line]
        assert result.returncode == 0 and not problems, result.stderr


def test_the_grafana_dashboard_uses_metrics_flowchat_exports(queue):
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b((?:flowchat|process|python)_[a-z_]+)", expr)}
    metrics = Metrics()
    metrics.set_queue({"ready": 0, "in_flight": 0, "delayed": 0, "dead": 0, "counters": {"succeeded:f": 1}})
    metrics.execution_event("f", "succeeded")
    metrics.node_ran("set", "ok", 0.01)
    metrics.ingress.labels("/hooks/{path}", "202").inc()
    exported = set(re.findall(r"^([a-z_]+?)(?:\{| )", metrics.render().decode(), re.M))
    assert used and used <= exported, used - exported
