"""The WhatsApp loop as a user runs it: `flowchat serve`, `flowchat simulate`, `flowchat messages`.

Outbox mode (no Twilio account) and Twilio mode (the real twilio library against the
local fake, which posts signed status callbacks back to the daemon).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from support import ROOT, daemon_env, run_cli, wait_for
from twilio_fake import ACCOUNT_SID, AUTH_TOKEN, TwilioFake

from flowchat.keys import Keys
from flowchat.messages import Ledger
from flowchat.redis_server import free_port

SHIPPED = ROOT / "flows" / "whatsapp_welcome.yaml"
STATUS_FLOW = """flow: delivery_watch
trigger: {type: twilio.status, match: {status: [delivered, failed]}}
nodes:
  - {id: seen, type: set, with: {values: {sid: "{{ trigger.MessageSid }}", by: "{{ trigger.message.node }}"}}}
"""


def wa_env(redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    # the tests read the send node's output after success: keep it (FLOWCHAT_COMPACT_SUCCEEDED=0)
    env = daemon_env(redis_url, FLOWCHAT_DATA_DIR=str(data_dir), FLOWCHAT_COMPACT_SUCCEEDED="0", **extra)
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_WHATSAPP_NUMBER"):
        env.pop(name, None) if name not in extra else None
    return env


@pytest.fixture
async def fake() -> AsyncIterator[TwilioFake]:
    server = await TwilioFake.start()
    yield server
    await server.stop()


async def outbound(redis: Redis) -> list[dict[str, str]]:
    return [m for m in await Ledger(redis, Keys("fc")).recent(limit=100) if m.get("direction") == "outbound"]


async def test_outbox_mode_runs_the_whole_loop_with_simulate(redis_url, redis, processes, tmp_path, flows_dir):
    (flows_dir / SHIPPED.name).write_text(SHIPPED.read_text())
    (flows_dir / "delivery_watch.yaml").write_text(STATUS_FLOW)
    port = free_port()
    env = wa_env(redis_url, tmp_path / "data")
    serve = processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=env)
    url = f"http://127.0.0.1:{port}"

    sent = run_cli(
        "simulate", "message", "--from", "+5511987654321", "--body", "oi", "--name", "Ana", "--url", url, env=env
    )

    assert sent.returncode == 0, sent.stderr
    assert (tmp_path / "data" / "twilio-signing-token").stat().st_mode & 0o777 == 0o600
    await wait_for(lambda: outbound(redis))
    [message] = await outbound(redis)
    assert message["status"] == "simulated" and message["to"] == "+5511987654321"
    assert message["flow"] == "whatsapp_welcome" and message["node"] == "reply"

    listed = run_cli("messages", "list", "--to", "+5511987654321", "--json", env=env)
    assert [row["sid"] for row in json.loads(listed.stdout) if row["direction"] == "outbound"] == [message["sid"]]
    assert run_cli("simulate", "status", message["sid"], "delivered", "--url", url, env=env).returncode == 0
    shown = json.loads(run_cli("messages", "show", message["sid"], "--json", env=env).stdout)
    assert shown["status"] == "delivered"
    assert [run["sid"] for run in await _finished(redis, "delivery_watch")] == [message["sid"]]

    forged = run_cli("simulate", "message", "--from", "+5511987654321", "--body", "x", "--url", url,
                 env={**env, "TWILIO_AUTH_TOKEN": "not-the-daemon-token"})  # fmt: skip
    assert forged.returncode == 1 and "403" in forged.stderr
    assert serve.poll() is None
    log = processes.log_of(serve)
    assert "987654321" not in log  # phones are masked in the daemon's log


async def test_twilio_mode_sends_through_the_api_and_status_callbacks_come_back(
    redis_url, redis, processes, tmp_path, flows_dir, fake
):
    (flows_dir / SHIPPED.name).write_text(SHIPPED.read_text())
    (flows_dir / "delivery_watch.yaml").write_text(STATUS_FLOW)
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    env = wa_env(
        redis_url, tmp_path / "data", TWILIO_ACCOUNT_SID=ACCOUNT_SID, TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_WHATSAPP_NUMBER="+14155550100", FLOWCHAT_TWILIO_API_URL=fake.url, FLOWCHAT_PUBLIC_URL=public,
    )  # fmt: skip
    processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=env)

    assert (
        run_cli("simulate", "message", "--from", "+5511987654321", "--body", "hi", "--url", public, env=env).returncode
        == 0
    )
    await wait_for(lambda: fake.ok_sends)
    [sent] = fake.ok_sends
    assert sent.one("StatusCallback") == f"{public}/twilio/status"
    await wait_for(lambda: outbound(redis))

    for status in ("sent", "delivered", "sent", "delivered"):
        assert await fake.callback(sent.sid, status) == 200

    ledger = Ledger(redis, Keys("fc"))
    stored = await ledger.get(sent.sid)
    assert stored is not None and stored["status"] == "delivered"
    assert fake.posts == 1
    runs = await _finished(redis, "delivery_watch")
    assert [run["by"] for run in runs] == ["reply"]


async def _finished(redis: Redis, flow: str) -> list[dict[str, Any]]:
    from flowchat.queue import Queue

    queue = Queue(redis, Keys("fc"))
    found: list[dict[str, Any]] = []

    async def done() -> bool:
        found.clear()
        for row in await queue.recent(50):
            if row.get("flow") == flow and row.get("status") == "succeeded":
                stored = await queue.get(row["id"])
                assert stored is not None
                found.append(stored[1]["seen"]["output"])
        return bool(found)

    await wait_for(done)
    return found
