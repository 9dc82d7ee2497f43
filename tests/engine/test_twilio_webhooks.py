"""``/twilio/message`` and ``/twilio/status``: signatures, outbox signing token, match routing, status ledger."""

from __future__ import annotations

import asyncio
import gc
import stat
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from twilio_fake import REFERENCE_INBOUND, TwilioFake

from flowchat.catalog import Catalog
from flowchat.contacts import Contacts
from flowchat.events import Events, unpack
from flowchat.ingress import create_app
from flowchat.keys import Keys
from flowchat.messages import Ledger, SentBy
from flowchat.metrics import Metrics
from flowchat.pipeliner import Pipeliner
from flowchat.queue import Queue
from flowchat.redis_server import free_port
from flowchat.settings import Settings
from flowchat.twilio_auth import TOKEN_FILE, sign
from flowchat.twilio_webhooks import TwilioWebhooks

TOKEN = "test_auth_token_0123456789abcdef"
PUBLIC = "https://flowchat.example.com"


@pytest.fixture
def write_flow(flows_dir: Path) -> Callable[..., None]:
    def write(name: str, trigger: dict[str, Any]) -> None:
        flow = {"flow": name, "trigger": trigger, "nodes": [{"id": "noop", "type": "set", "with": {"values": {}}}]}
        (flows_dir / f"{name}.yaml").write_text(yaml.safe_dump(flow))

    return write


@pytest.fixture
async def start(flows_dir, catalog_factory, queue: Queue, tmp_path) -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient] = []

    async def make(services: Any = None, app_queue: Queue | None = None, **changes: Any) -> TestClient:
        settings = Settings().with_changes(data_dir=tmp_path / "data", public_url=PUBLIC, **changes)
        catalog: Catalog = catalog_factory(flows_dir)
        assert not catalog.problems, catalog.problems
        hooks = TwilioWebhooks(settings, services)
        client = TestClient(TestServer(create_app(app_queue or queue, catalog, Metrics(), hooks)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def inbound(sid: str = "SM5f1c0e8b2a3d4c6e9f7a1b2c3d4e5f60", **fields: str) -> dict[str, str]:
    return {
        "MessageSid": sid, "SmsMessageSid": sid, "AccountSid": "AC0123456789abcdef0123456789abcdef",
        "From": "whatsapp:+5511987654321", "To": "whatsapp:+14155550100", "Body": "Oi, quero saber o preço",
        "ProfileName": "Ana Souza", "WaId": "5511987654321", "NumMedia": "0", "SomeNewTwilioField": "kept",
        **fields,
    }  # fmt: skip


async def post(
    client: TestClient, path: str, params: dict[str, str], *, token: str = TOKEN, url: str | None = None
) -> int:
    signature = sign(token, url or f"{PUBLIC}{path}", params)
    response = await client.post(path, data=params, headers={"X-Twilio-Signature": signature})
    return response.status


async def started(queue: Queue) -> list[tuple[str, dict[str, Any]]]:
    ids = [entry[1][b"e"].decode() for entry in await queue.redis.xrange(queue.keys.ready)]
    found = []
    for execution_id in ids:
        stored = await queue.get(execution_id)
        assert stored is not None
        found.append((stored[0]["flow"], stored[0]["trigger"]))
    return found


async def test_a_message_signed_for_the_public_url_starts_the_flow_with_every_field(write_flow, start, queue):
    write_flow("inbound", {"type": "twilio.message"})
    client = await start(twilio_auth_token=TOKEN)

    assert await post(client, "/twilio/message", inbound()) == 200

    [(flow, trigger)] = await started(queue)
    assert flow == "inbound"
    assert trigger["SomeNewTwilioField"] == "kept" and trigger["ProfileName"] == "Ana Souza"
    assert trigger["contact"]["phone"] == "+5511987654321"


@pytest.mark.parametrize(
    "forgery",
    ["wrong token", "wrong url", "tampered field", "missing header"],
)
async def test_bad_signatures_are_403_and_store_nothing(write_flow, start, queue, forgery):
    write_flow("inbound", {"type": "twilio.message"})
    client = await start(twilio_auth_token=TOKEN)
    params = inbound()
    if forgery == "missing header":
        status = (await client.post("/twilio/message", data=params)).status
    elif forgery == "wrong token":
        status = await post(client, "/twilio/message", params, token="not-the-token")
    elif forgery == "wrong url":
        status = await post(client, "/twilio/message", params, url="https://elsewhere.example.com/twilio/message")
    else:
        signature = sign(TOKEN, f"{PUBLIC}/twilio/message", params)
        tampered = {**params, "Body": "STOP"}
        status = (await client.post("/twilio/message", data=tampered, headers={"X-Twilio-Signature": signature})).status

    assert status == 403
    assert await queue.redis.dbsize() == 1  # the ready stream made by queue.setup(), nothing else


async def test_the_reference_fixture_signature_validates():
    """The worked example of the Twilio reference: 15 params, this URL, this token."""
    params = dict(REFERENCE_INBOUND)
    assert sign(TOKEN, "https://flowchat.example.com/twilio/inbound", params) == "96QofFr77/Pwj1BjOqkdbH0pL/w="


@pytest.fixture
async def crm(queue: Queue) -> AsyncIterator[Any]:
    """The contact book and the events stream on the queue's Redis, as ``flowchat serve`` installs them."""
    events = Events(queue.redis, queue.keys)
    await events.setup()
    contacts = Contacts(queue.redis, queue.keys, events=events)
    yield types.SimpleNamespace(extra={"contacts": contacts, "events": events})
    await events.flush()


@pytest.fixture
def round_trips(monkeypatch) -> list[list[str]]:
    """Every round trip to Redis of the auto-pipeline (the command names) and every command sent apart."""
    trips: list[list[str]] = []
    pipelined, written, sent_apart = Pipeliner.round_trip, Pipeliner._write, Redis.execute_command

    async def counted(self: Pipeliner, commands: list[tuple[Any, ...]]) -> list[Any]:
        trips.append([str(command[0]) for command in commands])
        return await pipelined(self, commands)

    def counted_batch(self: Pipeliner, link: Any, batch: list[tuple[tuple[Any, ...], Any]]) -> None:
        trips.append([str(command[0]) for command, _ in batch])
        written(self, link, batch)

    async def apart(self: Any, *args: Any, **options: Any) -> Any:
        trips.append([f"apart:{args[0]}"])
        return await sent_apart(self, *args, **options)

    monkeypatch.setattr(Pipeliner, "round_trip", counted)
    monkeypatch.setattr(Pipeliner, "_write", counted_batch)
    monkeypatch.setattr(Redis, "execute_command", apart)
    return trips


async def test_an_inbound_is_recorded_and_enqueued_in_two_round_trips(write_flow, start, queue, crm, round_trips):
    """Contact and ledger writes share the first; the enqueue takes the contact and message events with it."""
    write_flow("inbound", {"type": "twilio.message"})
    client = await start(crm, twilio_auth_token=TOKEN)
    assert await post(client, "/twilio/message", inbound("SMwarm", From="whatsapp:+5511900000000")) == 200
    await crm.extra["events"].flush()  # its events may leave after its answer
    round_trips.clear()  # the first request also stored the flow's YAML

    assert await post(client, "/twilio/message", inbound("SMcounted")) == 200

    trips = [sorted(trip) for trip in round_trips]
    assert trips == [["EVALSHA", "EVALSHA"], ["EVALSHA", "XADD"]], trips  # the two events share one entry
    [_, (_, trigger)] = await started(queue)
    assert trigger["contact"]["created"] is True and trigger["contact"]["phone"] == "+5511987654321"
    assert (await Ledger(queue.redis, queue.keys).get("SMcounted") or {}).get("direction") == "inbound"
    entries = await queue.redis.xrange(queue.keys.events)
    kinds = [row[b"type"] for entry_id, fields in entries for row in unpack(fields, entry_id)]
    assert kinds.count(b"message") == 2 and kinds.count(b"contact") == 2


async def test_redis_unreachable_is_503_with_retry_after_and_no_stray_task_errors(write_flow, start, caplog):
    write_flow("inbound", {"type": "twilio.message"})
    down = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    events = Events(down, Keys("fc"))
    book = types.SimpleNamespace(extra={"contacts": Contacts(down, Keys("fc"), events=events), "events": events})
    client = await start(book, app_queue=Queue(down, Keys("fc")), twilio_auth_token=TOKEN)
    try:
        response = await client.post(
            "/twilio/message",
            data=inbound(),
            headers={"X-Twilio-Signature": sign(TOKEN, f"{PUBLIC}/twilio/message", inbound())},
        )
        assert (response.status, response.headers.get("Retry-After")) == (503, "1")
        gc.collect()
        await asyncio.sleep(0)
        assert "never retrieved" not in caplog.text
    finally:
        await down.aclose()


async def test_stop_opts_out_at_ingress_and_the_flow_sees_it(write_flow, start, queue, crm):
    write_flow("inbound", {"type": "twilio.message"})
    client = await start(crm, twilio_auth_token=TOKEN)

    assert await post(client, "/twilio/message", inbound("SMstop", Body="STOP")) == 200
    assert await post(client, "/twilio/message", inbound("SMstop", Body="STOP")) == 200  # Twilio retried

    [(_, trigger)] = await started(queue)
    assert trigger["contact"]["consent"]["state"] == "opted_out"
    contact = await crm.extra["contacts"].get("+5511987654321")
    assert contact is not None and contact["consent"]["state"] == "opted_out"


async def test_outbox_mode_signs_with_a_private_local_token(write_flow, start, queue, tmp_path):
    write_flow("inbound", {"type": "twilio.message"})
    client = await start()
    params = inbound()

    assert await post(client, "/twilio/message", params) == 403  # no account token: the local one signs
    token_file = tmp_path / "data" / TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert await post(client, "/twilio/message", params, token=token_file.read_text().strip()) == 200
    assert len(await started(queue)) == 1


async def test_a_repeated_message_sid_starts_nothing_new(write_flow, start, queue):
    write_flow("inbound", {"type": "twilio.message"})
    client = await start(twilio_auth_token=TOKEN)

    for _ in range(3):
        assert await post(client, "/twilio/message", inbound("SMrepeated")) == 200
    assert await post(client, "/twilio/message", inbound("SMother")) == 200

    assert len(await started(queue)) == 2


async def test_match_routes_by_body_keywords_button_and_sender_with_a_default(write_flow, start, queue):
    write_flow("pricing", {"type": "twilio.message", "match": {"body": r"pre(ç|c)o|price"}})
    write_flow("support", {"type": "twilio.message", "match": {"keywords": ["help", "falar com atendente"]}})
    write_flow("confirm", {"type": "twilio.message", "match": {"button": "confirm", "from": ["+5511987654321"]}})
    write_flow("fallback", {"type": "twilio.message", "match": {"default": True}})
    write_flow("audit", {"type": "twilio.message"})
    client = await start(twilio_auth_token=TOKEN)
    cases = {
        "SM1": {"Body": "What's the PRICE?"},
        "SM2": {"Body": "quero falar com  atendente!"},
        "SM3": {"Body": "helpful tips"},  # "help" is not a whole word here
        "SM4": {"Body": "Confirmar", "ButtonPayload": "confirm"},
        "SM5": {"Body": "Confirmar", "ButtonPayload": "confirm", "From": "whatsapp:+15550001111"},
    }
    for sid, fields in cases.items():
        assert await post(client, "/twilio/message", inbound(sid, **fields)) == 200

    routed: dict[str, list[str]] = {}
    for flow, trigger in await started(queue):
        routed.setdefault(trigger["MessageSid"], []).append(flow)
    assert {sid: sorted(flows) for sid, flows in routed.items()} == {
        "SM1": ["audit", "pricing"],
        "SM2": ["audit", "support"],
        "SM3": ["audit", "fallback"],
        "SM4": ["audit", "confirm"],
        "SM5": ["audit", "fallback"],
    }


def test_a_bad_body_regex_is_a_load_error(flows_dir, catalog_factory, write_flow):
    write_flow("broken", {"type": "twilio.message", "match": {"body": "(unclosed"}})

    catalog = catalog_factory(flows_dir)

    assert "RE2" in str(catalog.problems)


async def test_a_pathological_body_regex_cannot_freeze_ingress(write_flow, start, queue):
    write_flow("evil", {"type": "twilio.message", "match": {"body": "(a+)+$"}})
    client = await start(twilio_auth_token=TOKEN)

    assert await post(client, "/twilio/message", inbound("SMevil", Body="a" * 5000 + "!")) == 200


async def test_status_moves_forward_only_and_flows_run_on_real_changes(write_flow, start, queue):
    write_flow("every_status", {"type": "twilio.status"})
    write_flow("failures", {"type": "twilio.status", "match": {"status": ["failed", "undelivered"]}})
    client = await start(twilio_auth_token=TOKEN)
    ledger = Ledger(queue.redis, Keys("fc"))
    await ledger.record_send(
        {"sid": "SMabc", "status": "queued", "to": "+5511987654321", "from": "+14155550100"},
        SentBy("welcome", "x-1", "greet"),
    )
    fake = TwilioFake(auth_token=TOKEN)
    fake_url = str(client.make_url("/twilio/status"))
    for status in ["sent", "delivered", "sent", "delivered", "read", "failed"]:
        code = await fake.callback("SMabc", status, url=fake_url, sign_for=f"{PUBLIC}/twilio/status")
        assert code == 200

    stored = await ledger.get("SMabc")
    assert stored is not None and stored["status"] == "read"
    runs = await started(queue)
    assert [(flow, trigger["MessageStatus"]) for flow, trigger in runs] == [
        ("every_status", "sent"),
        ("every_status", "delivered"),
        ("every_status", "read"),
    ]
    assert runs[0][1]["message"]["execution"] == "x-1" and runs[0][1]["message"]["node"] == "greet"


async def test_a_failed_status_is_terminal_and_keeps_the_error_code(write_flow, start, queue):
    write_flow("failures", {"type": "twilio.status", "match": {"status": ["failed", "undelivered"]}})
    client = await start(twilio_auth_token=TOKEN)
    fake, url = TwilioFake(auth_token=TOKEN), str(client.make_url("/twilio/status"))

    for status, code in [("failed", "63016"), ("delivered", ""), ("failed", "63016")]:
        await fake.callback("SMlate", status, error_code=code, url=url, sign_for=f"{PUBLIC}/twilio/status")

    stored = await Ledger(queue.redis, Keys("fc")).get("SMlate")
    assert stored is not None and (stored["status"], stored["error_code"]) == ("failed", "63016")
    [(flow, trigger)] = await started(queue)
    assert flow == "failures" and trigger["ErrorCode"] == "63016"


async def test_an_unsigned_status_callback_changes_nothing(start, queue):
    client = await start(twilio_auth_token=TOKEN)
    fake = TwilioFake(auth_token="forged")

    code = await fake.callback("SMx", "delivered", url=str(client.make_url("/twilio/status")))

    assert code == 403
    assert await Ledger(queue.redis, Keys("fc")).get("SMx") is None


@pytest.mark.parametrize(
    "params",
    [
        {"MessageSid": "SMh1"},  # no From, no Body
        {"MessageSid": "SMh2", "From": "whatsapp:ID.4566546130240823", "Body": "business-scoped id"},
        {"MessageSid": "SMh3", "From": "whatsapp:+1", "Body": "\x00\ud7ff" + "é" * 5000},
        {"From": "whatsapp:+5511987654321", "Body": "no sid"},
        {"MessageSid": "SMh4", "From": "whatsapp:+5511987654321", "Body": "x" * 200_000},
    ],
)
async def test_odd_but_signed_messages_are_answered_not_crashed_on(write_flow, start, queue, params):
    write_flow("inbound", {"type": "twilio.message", "match": {"body": "x+"}})
    write_flow("other", {"type": "twilio.message", "match": {"default": True}})
    client = await start(twilio_auth_token=TOKEN)

    assert await post(client, "/twilio/message", params) == 200
    assert await post(client, "/twilio/status", {"MessageSid": params.get("MessageSid", "")}) == 200
