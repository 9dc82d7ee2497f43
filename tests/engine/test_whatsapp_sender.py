"""flowchat.whatsapp: the sender with the CRM's services: consent, the 24-hour window, 21610, pacing, Twilio errors."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from support import stream_events
from twilio_fake import ACCOUNT_SID, AUTH_TOKEN, TwilioFake

from flowchat.contacts import Contacts
from flowchat.errors import NodeError
from flowchat.events import Events
from flowchat.keys import Keys
from flowchat.limiter import Limiter
from flowchat.node import Suspend
from flowchat.settings import Settings
from flowchat.whatsapp import WhatsApp, retry_after, twilio_error

TO = "+5511987654321"
TEMPLATE = {"content_sid": "HX0123456789abcdef0123456789abcdef", "variables": {"1": "Ana"}}


@pytest.fixture
async def fake() -> AsyncIterator[TwilioFake]:
    server = await TwilioFake.start()
    yield server
    await server.stop()


@pytest.fixture
def book(redis: Redis) -> Contacts:
    return Contacts(redis, Keys("fc"), events=Events(redis, Keys("fc")))


@pytest.fixture
async def sender(fake: TwilioFake, redis: Redis, book: Contacts) -> AsyncIterator[Any]:
    made: list[WhatsApp] = []

    def make(**changes: Any) -> WhatsApp:
        options = {"recipient_rate": "off", **changes}
        settings = Settings().with_changes(
            twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN, twilio_api_url=fake.url,
            twilio_whatsapp_number="+14155550100", **options,
        )  # fmt: skip
        whatsapp = WhatsApp(
            settings, redis=redis, keys=Keys("fc"), contacts=book, limiter=Limiter(redis, Keys("fc")),
            events=book.events,
        )  # fmt: skip
        made.append(whatsapp)
        return whatsapp

    yield make
    for whatsapp in made:
        await whatsapp.aclose()


async def wrote(book: Contacts, phone: str = TO, hours_ago: float = 0.0, sid: str = "SMin1") -> None:
    at_ms = int((time.time() - hours_ago * 3600) * 1000)
    await book.record_inbound(phone, profile_name="Ana", message_sid=sid, at_ms=at_ms)


async def test_inside_the_window_the_body_is_sent(sender, book, fake):
    await wrote(book, hours_ago=23)

    output = await sender().send(to=TO, body="hi", template=TEMPLATE, execution="x1", node="n")

    assert output["used_template"] is False
    assert fake.sent[0].one("Body") == "hi" and fake.sent[0].one("ContentSid") is None


@pytest.mark.parametrize("hours_ago", [None, 25.0])
async def test_outside_the_window_the_template_is_sent_instead(sender, book, fake, hours_ago):
    if hours_ago is not None:
        await wrote(book, hours_ago=hours_ago)

    output = await sender().send(to=TO, body="hi", template=TEMPLATE, execution="x1", node="n")

    assert output["used_template"] is True
    [sent] = fake.sent
    assert sent.one("ContentSid") == TEMPLATE["content_sid"] and sent.one("Body") is None


@pytest.mark.parametrize("hours_ago", [None, 25.0])
async def test_outside_the_window_without_a_template_fails_without_calling_twilio(sender, book, fake, hours_ago):
    if hours_ago is not None:
        await wrote(book, hours_ago=hours_ago)

    with pytest.raises(NodeError) as failed:
        await sender().send(to=TO, body="hi", execution="x1", node="n")

    assert failed.value.code == "outside-session-window" and failed.value.retryable is False
    assert fake.posts == 0


async def test_an_opted_out_contact_gets_nothing_and_twilio_is_not_called(sender, book, fake):
    await wrote(book)
    await book.set_consent(TO, "opted_out", "test")

    with pytest.raises(NodeError) as failed:
        await sender().send(to=TO, body="hi", template=TEMPLATE, execution="x1", node="n")

    assert failed.value.code == "contact-opted-out"
    assert fake.posts == 0


async def test_twilio_21610_opts_the_contact_out(sender, book, fake):
    await wrote(book)
    fake.script("21610")

    with pytest.raises(NodeError) as failed:
        await sender().send(to=TO, body="hi", execution="x1", node="n")

    assert failed.value.code == "twilio-21610"
    contact = await book.get(TO)
    assert contact is not None and contact["consent"]["state"] == "opted_out"
    assert contact["consent"]["source"] == "twilio-21610"
    with pytest.raises(NodeError, match="opted out"):
        await sender().send(to=TO, body="again", execution="x2", node="n")
    assert fake.posts == 1


async def test_a_second_send_to_one_recipient_within_the_pace_is_deferred_not_slept(sender, book, fake):
    await wrote(book)
    await wrote(book, "+5511987650000", sid="SMin2")
    whatsapp = sender(recipient_rate="1/6s", send_rate="off")

    await whatsapp.send(to=TO, body="one", execution="x1", node="n")
    started = time.monotonic()
    with pytest.raises(Suspend) as paced:
        await whatsapp.send(to=TO, body="two", execution="x2", node="n")

    assert time.monotonic() - started < 1.0  # told when to come back, not slept on
    assert 4.0 < paced.value.until - time.time() <= 6.5
    assert fake.posts == 1
    await whatsapp.send(to="+5511987650000", body="other", execution="x3", node="n")  # others are not held up
    assert fake.posts == 2


async def test_sends_write_message_events(sender, book, fake, redis):
    await wrote(book)

    output = await sender().send(to=TO, body="hi", flow="crm", execution="x1", node="reply")
    await book.events.flush()

    events = stream_events(await redis.xrange(Keys("fc").events))
    messages = [event for event in events if event["type"] == "message"]
    assert len(messages) == 1
    assert messages[0]["execution_id"] == "x1" and messages[0]["node"] == "reply"
    assert messages[0]["data"]["sid"] == output["sid"] and messages[0]["data"]["phone"] == TO


async def test_sends_from_one_number_are_spaced_at_the_sender_rate(sender, book, fake):
    for index in range(3):
        await wrote(book, f"+551198765000{index}", sid=f"SMw{index}")
    whatsapp = sender(send_rate="10/1s")

    await whatsapp.send(to="+5511987650000", body="a", execution="y0", node="n")
    with pytest.raises(Suspend) as paced:
        await whatsapp.send(to="+5511987650001", body="b", execution="y1", node="n")

    assert 0.0 < paced.value.until - time.time() <= 0.11  # the next 100 ms slot, reserved for y1
    assert fake.posts == 1


def test_error_classes_and_retry_after():
    from twilio.base.exceptions import TwilioRestException

    def err(status: int, code: int) -> NodeError:
        return twilio_error(TwilioRestException(status, "uri", "msg", code), {"Retry-After": "7"})

    assert err(429, 20429).retryable and err(429, 20429).retry_after == 7.0
    assert err(400, 63018).retryable and err(503, 20503).retryable
    for code in (21211, 21408, 21610, 21614, 63016, 63024, 63032):
        assert not err(400, code).retryable and err(400, code).code == f"twilio-{code}"
    assert not err(404, 20404).retryable
    assert retry_after({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}) == 0.0
    assert retry_after(None) is None
