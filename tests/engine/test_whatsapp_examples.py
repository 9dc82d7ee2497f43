"""Every WhatsApp example runs through `flowchat serve` as a user runs it, driven by `flowchat simulate`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from support import ROOT, daemon_env, run_cli, wait_for
from twilio_fake import ACCOUNT_SID, AUTH_TOKEN, TwilioFake

from flowchat.contacts import Contacts
from flowchat.keys import Keys
from flowchat.queue import Queue
from flowchat.redis_server import free_port

EXAMPLES = ROOT / "examples"
ANA = "+5511987654321"


@pytest.fixture
async def fake() -> AsyncIterator[TwilioFake]:
    server = await TwilioFake.start()
    yield server
    await server.stop()


class Daemon:
    """One `flowchat serve` over some examples, with helpers to drive and inspect it."""

    def __init__(self, processes: Any, redis: Redis, env: dict[str, str], port: int) -> None:
        self.processes, self.redis, self.env, self.url = processes, redis, env, f"http://127.0.0.1:{port}"
        self.queue = Queue(redis, Keys("fc"))
        self.contacts = Contacts(redis, Keys("fc"))

    def simulate(self, *args: str) -> None:
        done = run_cli("simulate", *args, "--url", self.url, env=self.env)
        assert done.returncode == 0, done.stderr

    async def hook(self, path: str, body: dict[str, Any]) -> str:
        async with aiohttp.ClientSession() as http, http.post(f"{self.url}/hooks/{path}", json=body) as response:
            assert response.status == 202, await response.text()
            return str((await response.json())["execution_id"])

    async def runs(self, flow: str, count: int = 1) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The first ``count`` finished executions of ``flow`` (oldest first): (meta, nodes)."""
        found: list[tuple[dict[str, Any], dict[str, Any]]] = []

        async def done() -> bool:
            found.clear()
            for row in reversed(await self.queue.recent(200)):
                if row["flow"] == flow and row["status"] in ("succeeded", "failed"):
                    stored = await self.queue.get(row["id"])
                    assert stored is not None
                    found.append(stored)
            return len(found) >= count

        await wait_for(done)
        return found[:count]


@pytest.fixture
def daemon(redis_url, redis, processes, tmp_path, flows_dir) -> Any:
    def start(*examples: str, **extra: str) -> Daemon:
        for name in examples:
            (flows_dir / f"{name}.yaml").write_text((EXAMPLES / f"{name}.yaml").read_text())
        port = free_port()
        # the tests read node outputs and times after success: keep them (FLOWCHAT_COMPACT_SUCCEEDED=0)
        env = daemon_env(redis_url, FLOWCHAT_DATA_DIR=str(tmp_path / "data"), FLOWCHAT_COMPACT_SUCCEEDED="0", **extra)
        for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_WHATSAPP_NUMBER"):
            if name not in extra:
                env.pop(name, None)
        processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=env)
        return Daemon(processes, redis, env, port)

    return start


async def test_crm_example_replies_inside_the_window_and_counts(daemon, redis):
    d: Daemon = daemon("crm")

    d.simulate("message", "--from", ANA, "--body", "Oi, quero saber o preço", "--name", "Ana Souza")

    [(meta, nodes)] = await d.runs("crm")
    assert meta["status"] == "succeeded", meta.get("error")
    assert nodes["reply"]["output"]["used_template"] is False
    assert nodes["reply"]["output"]["status"] == "simulated"
    contact = await d.contacts.get(ANA)
    assert contact is not None and contact["tags"] == ["inbound", "new"] and contact["name"] == "Ana Souza"
    assert contact["last_inbound_at"] is not None


async def test_opt_out_example_and_a_send_to_an_opted_out_contact(daemon, redis):
    d: Daemon = daemon("opt_out", "template_window", FLOWCHAT_RECIPIENT_RATE="off")

    d.simulate("message", "--from", ANA, "--body", "  Stop ")
    [(meta, _)] = await d.runs("opt_out")
    assert meta["status"] == "succeeded", meta.get("error")
    contact = await d.contacts.get(ANA)
    assert contact is not None and contact["consent"]["state"] == "opted_out" and "opted-out" in contact["tags"]

    await d.hook("order_shipped", {"phone": ANA, "name": "Ana", "order": "1042"})
    [(meta, nodes)] = await d.runs("order_shipped")
    assert meta["status"] == "failed" and nodes["notify"]["error"]["code"] == "contact-opted-out"

    d.simulate("message", "--from", ANA, "--body", "START")
    _, (meta, nodes) = await d.runs("opt_out", 2)
    assert meta["status"] == "succeeded", meta.get("error")
    assert nodes["welcome_back"]["output"]["used_template"] is False  # START opened the window
    contact = await d.contacts.get(ANA)
    assert contact is not None and contact["consent"]["state"] == "opted_in" and "opted-out" not in contact["tags"]


async def test_template_window_example_uses_the_template_for_a_contact_who_never_wrote(daemon):
    d: Daemon = daemon("template_window")

    await d.hook("order_shipped", {"phone": "+5511987650000", "name": "Bia", "order": "7"})

    [(meta, nodes)] = await d.runs("order_shipped")
    assert meta["status"] == "succeeded", meta.get("error")
    assert nodes["notify"]["output"]["used_template"] is True


async def test_delivery_failure_example_tags_the_contact_from_a_failed_callback(daemon, fake, redis):
    port_env = {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_WHATSAPP_NUMBER": "+14155550100",
        "FLOWCHAT_TWILIO_API_URL": fake.url,
    }  # fmt: skip
    d: Daemon = daemon("crm", "delivery_failure", **port_env)

    d.simulate("message", "--from", ANA, "--body", "hello")
    await wait_for(lambda: fake.ok_sends)
    [sent] = fake.ok_sends
    assert await fake.callback(sent.sid, "failed", error_code="63016", url=f"{d.url}/twilio/status") == 200

    [(meta, _)] = await d.runs("delivery_failure")
    assert meta["status"] == "succeeded", meta.get("error")
    contact = await d.contacts.get(ANA)
    assert contact is not None and "undeliverable" in contact["tags"]
    assert contact["attributes"]["last_failure"] == "63016"
    assert fake.posts == 1


async def test_a_second_reply_to_one_recipient_is_deferred_then_sent(daemon, fake):
    d: Daemon = daemon("crm", FLOWCHAT_RECIPIENT_RATE="1/2s")

    d.simulate("message", "--from", ANA, "--body", "one")
    d.simulate("message", "--from", ANA, "--body", "two")

    first, second = await d.runs("crm", 2)
    assert first[0]["status"] == second[0]["status"] == "succeeded"
    gap = abs(second[1]["reply"]["finished_at"] - first[1]["reply"]["finished_at"])
    assert gap >= 1.5  # the second waited for the recipient's next slot, parked in Redis
    sids = {first[1]["reply"]["output"]["sid"], second[1]["reply"]["output"]["sid"]}
    assert len(sids) == 2
