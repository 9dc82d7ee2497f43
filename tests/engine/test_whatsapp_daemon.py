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
from support import ROOT, daemon_env, mark_node, run_cli, settled, wait_for, write_flow
from twilio_fake import ACCOUNT_SID, AUTH_TOKEN, TwilioFake

from flowchat.keys import Keys
from flowchat.loader import load_flow
from flowchat.messages import Ledger
from flowchat.queue import Queue
from flowchat.redis_server import free_port
from flowchat.registry import load_registry

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


async def test_a_worker_killed_after_a_send_leaves_it_sent_once(redis_url, redis, processes, tmp_path, flows_dir, fake):
    """The send's state rides with a later write; the worker that takes over finds its send record instead."""
    marks = tmp_path / "marks"
    slow = mark_node(marks, "slow", sleep=30, sleep_first_run_only=True) | {"timeout": "60s"}
    send = {
        "id": "send",
        "type": "whatsapp.send",
        "with": {"to": "+5511987654321", "template": {"content_sid": "HX" + "0" * 32}},
    }
    write_flow(flows_dir, "send_then_crash", [send, slow])
    env = wa_env(
        redis_url, tmp_path / "data", TWILIO_ACCOUNT_SID=ACCOUNT_SID, TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_WHATSAPP_NUMBER="+14155550100", FLOWCHAT_TWILIO_API_URL=fake.url, FLOWCHAT_VISIBILITY_TIMEOUT="1",
        FLOWCHAT_SEND_RATE="off", FLOWCHAT_RECIPIENT_RATE="off",
    )  # fmt: skip
    victim = processes.start("worker", "--flows", str(flows_dir), env=env)
    queue = Queue(redis, Keys("fc"))
    flow = load_flow(flows_dir / "send_then_crash.yaml", load_registry(ROOT / "tests" / "fixtures" / "plugins"))
    await queue.store_flow(flow)
    [execution_id] = await queue.enqueue_many(flow.name, flow.version, [{}])

    await wait_for(lambda: marks.exists() and "slow start" in marks.read_text())
    victim.kill()
    victim.wait()
    processes.start("worker", "--flows", str(flows_dir), env=env)

    assert (await settled(queue, execution_id))["status"] == "succeeded"
    assert fake.posts == 1  # the take-over ran the send node again and found its record
    assert len(await outbound(redis)) == 1
