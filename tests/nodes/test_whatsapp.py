"""``whatsapp.send`` with the real twilio library against a local Twilio-compatible server.

Each case counts the POSTs the fake received: a send that must not be repeated is
asserted to have reached Twilio exactly once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from twilio_fake import ACCOUNT_SID, AUTH_TOKEN, TwilioFake

import flowchat
from flowchat.keys import Keys
from flowchat.messages import Ledger
from flowchat.settings import Settings
from flowchat.whatsapp import WhatsApp

TO = "+5511987654321"
SEND = """
- id: send
  type: whatsapp.send
  retry: {max_attempts: 3, backoff: 10ms, max_backoff: 200ms}
  with:
    to: "{{ trigger.to }}"
    body: "Hello {{ trigger.name }}"
"""


@pytest.fixture
async def fake() -> AsyncIterator[TwilioFake]:
    server = await TwilioFake.start()
    yield server
    await server.stop()


def twilio_settings(fake: TwilioFake, **changes: Any) -> Settings:
    return Settings().with_changes(
        twilio_account_sid=ACCOUNT_SID,
        twilio_auth_token=AUTH_TOKEN,
        twilio_api_url=fake.url,
        twilio_whatsapp_number="+14155550100",
        public_url="https://flowchat.example.com",
        **changes,
    )


@pytest.fixture(scope="module")
def wa_registry() -> flowchat.Registry:
    """Built-ins plus the installed ``whatsapp`` service (what ``whatsapp.send`` declares it needs)."""
    registry = flowchat.Registry()
    registry.load_builtins()
    registry.services.add("whatsapp")
    return registry


@pytest.fixture
def send_flow(write_flow, wa_registry, redis: Redis) -> Callable[..., Any]:
    """Run a flow with a ``whatsapp`` service built from ``settings`` (on the test Redis)."""

    async def run(
        settings: Settings, nodes: str = SEND, trigger: dict[str, Any] | None = None, execution_id: str | None = None
    ) -> flowchat.Execution:
        flow = flowchat.load_flow(write_flow(nodes), wa_registry)
        sender = WhatsApp(settings, redis=redis, keys=Keys("fc"))
        try:
            async with flowchat.open_services(whatsapp=sender) as services:
                execution = flowchat.Execution.new(flow, trigger or {"to": TO, "name": "Ana"}, execution_id)
                return await flowchat.Runner(services).run(flow, execution)
        finally:
            await sender.aclose()

    return run


async def test_a_send_posts_once_and_is_recorded(send_flow, fake, redis):
    execution = await send_flow(twilio_settings(fake))

    assert execution.status == "succeeded", execution.nodes["send"].error
    output = execution.nodes["send"].output
    assert fake.posts == 1
    sent = fake.sent[0]
    assert output == {"sid": sent.sid, "status": "queued", "to": TO, "used_template": False}
    assert sent.one("To") == f"whatsapp:{TO}" and sent.one("From") == "whatsapp:+14155550100"
    assert sent.one("Body") == "Hello Ana"
    assert sent.one("StatusCallback") == "https://flowchat.example.com/twilio/status"
    stored = await Ledger(redis, Keys("fc")).get(sent.sid)
    assert stored is not None
    assert stored["status"] == "queued" and stored["execution"] == execution.id and stored["node"] == "send"


async def test_429_then_success_retries_honouring_retry_after(send_flow, fake):
    fake.script("429")

    execution = await send_flow(twilio_settings(fake))

    assert execution.status == "succeeded"
    assert fake.posts == 2
    assert execution.nodes["send"].attempts == 2


async def test_500_then_success_retries(send_flow, fake):
    fake.script("500")

    execution = await send_flow(twilio_settings(fake))

    assert execution.status == "succeeded"
    assert fake.posts == 2


@pytest.mark.parametrize("code", ["21211", "21610", "63016"])
async def test_permanent_twilio_errors_fail_at_once_keeping_the_code(send_flow, fake, code):
    fake.script(code)

    execution = await send_flow(twilio_settings(fake))

    assert execution.status == "failed"
    error = execution.nodes["send"].error
    assert error["code"] == f"twilio-{code}" and error["retryable"] is False
    assert fake.posts == 1


async def test_a_hung_request_times_out_and_posts_once_per_attempt(send_flow, fake):
    fake.script("hang")
    nodes = SEND.replace("max_attempts: 3", "max_attempts: 1")

    execution = await send_flow(twilio_settings(fake, twilio_timeout=0.3), nodes)

    assert execution.status == "failed"
    assert execution.nodes["send"].error["code"] == "twilio-timeout"
    assert execution.nodes["send"].error["retryable"] is True
    assert fake.posts == 1


async def test_a_replayed_execution_never_sends_again(send_flow, fake):
    first = await send_flow(twilio_settings(fake), execution_id="x-replayed")
    again = await send_flow(twilio_settings(fake), execution_id="x-replayed")

    assert fake.posts == 1
    assert again.nodes["send"].output == first.nodes["send"].output


async def test_template_media_and_sender_reach_twilio_as_fields(send_flow, fake):
    nodes = """
    - id: send
      type: whatsapp.send
      with:
        to: "whatsapp:+5511987654321"
        from: "+14155559999"
        template: {content_sid: HX0123456789abcdef0123456789abcdef, variables: {"1": Ana, "2": 3}}
    - id: pic
      type: whatsapp.send
      with: {to: "+5511987654321", body: see, media: ["https://example.com/a.jpg", "https://example.com/b.jpg"]}
    """
    execution = await send_flow(twilio_settings(fake), nodes)

    assert execution.status == "succeeded", execution.nodes
    template, pic = fake.sent
    assert template.one("ContentSid") == "HX0123456789abcdef0123456789abcdef"
    assert json.loads(template.one("ContentVariables") or "") == {"1": "Ana", "2": "3"}
    assert template.one("Body") is None and template.one("From") == "whatsapp:+14155559999"
    assert execution.nodes["send"].output["used_template"] is True
    assert pic.form["MediaUrl"] == ["https://example.com/a.jpg", "https://example.com/b.jpg"]


async def test_outbox_mode_records_simulated_messages_and_calls_nothing(send_flow, fake, redis, caplog):
    caplog.set_level("INFO", "flowchat.whatsapp")

    execution = await send_flow(Settings().with_changes(twilio_api_url=fake.url))

    output = execution.nodes["send"].output
    assert execution.status == "succeeded"
    assert output["status"] == "simulated" and output["sid"].startswith("SM")
    assert fake.posts == 0
    stored = await Ledger(redis, Keys("fc")).get(output["sid"])
    assert stored is not None and stored["status"] == "simulated" and stored["body"] == "Hello Ana"
    assert "+5511***4321" in caplog.text or "***" in caplog.text
    assert "987654321" not in caplog.text


@pytest.mark.parametrize(
    ("with_", "problem"),
    [
        ('{to: "+15551234567", body: ""}', "at least 1"),
        ('{to: "+15551234567", body: "' + "x" * 1601 + '"}', "at most 1600"),
        ('{to: "+15551234567"}', "give a body, media or a template"),
        ('{to: "+15551234567", media: ["ftp://x"]}', "http(s)"),
    ],
)
async def test_bad_configs_fail_with_a_clear_code(send_flow, fake, with_, problem):
    nodes = f"- id: send\n  type: whatsapp.send\n  with: {with_}\n"
    try:
        execution = await send_flow(twilio_settings(fake), nodes)
    except flowchat.FlowInvalid as invalid:
        assert problem in str(invalid)
    else:
        assert execution.nodes["send"].error["code"] == "node-config-invalid"
        assert problem in execution.nodes["send"].error["message"]
    assert fake.posts == 0


async def test_an_invalid_phone_fails_without_calling_twilio(send_flow, fake):
    execution = await send_flow(twilio_settings(fake), trigger={"to": "12345", "name": "x"})

    assert execution.nodes["send"].error["code"] == "invalid-phone"
    assert fake.posts == 0
