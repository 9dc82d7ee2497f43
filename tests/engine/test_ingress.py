"""HTTP ingress over real loopback HTTP (aiohttp's TestServer) against the real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import support
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from twilio.request_validator import RequestValidator

from flowchat.catalog import Catalog
from flowchat.ingress import create_app
from flowchat.keys import Keys
from flowchat.metrics import Metrics
from flowchat.queue import Queue
from flowchat.redis_server import free_port
from flowchat.settings import Settings

SECRET = "s3cret-hmac-key"
TOKEN = "bearer-token-123"
TWILIO_TOKEN = "twilio-auth-token"
NOOP = [{"id": "noop", "type": "test.noop"}]

WriteFlow = Callable[..., Path]
ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def write_flow(flows_dir: Path) -> WriteFlow:
    """Write a one-node flow file with the given trigger into the flows folder."""

    def write(name: str, trigger: dict[str, Any]) -> Path:
        return support.write_flow(flows_dir, name, NOOP, trigger)

    return write


@pytest.fixture
async def client_factory(
    flows_dir: Path, catalog_factory: Callable[[Path], Catalog], queue: Queue
) -> AsyncIterator[ClientFactory]:
    """An HTTP client on a real server running the ingress app over the flows folder as it is now."""
    clients: list[TestClient] = []

    async def make(app_queue: Queue | None = None, metrics: Metrics | None = None) -> TestClient:
        catalog = catalog_factory(flows_dir)
        assert not catalog.problems, catalog.problems
        client = TestClient(TestServer(create_app(app_queue or queue, catalog, metrics or Metrics())))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def unreachable_queue() -> AsyncIterator[Queue]:
    """A queue whose Redis client points at a port nothing listens on."""
    client = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    yield Queue(client, Keys("fc"))
    await client.aclose()


async def stored_count(queue: Queue) -> tuple[int, int]:
    """(executions in the index, entries on the ready stream)."""
    return await queue.total(), int(await queue.redis.xlen(queue.keys.ready))


async def ready_ids(queue: Queue) -> list[str]:
    return [fields[b"e"].decode() for _, fields in await queue.redis.xrange(queue.keys.ready)]


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    """A body sent with chunked transfer encoding (no Content-Length), a piece at a time."""
    for start in range(0, len(body), size):
        yield body[start : start + size]
        await asyncio.sleep(0.01)


# --- webhooks: accepted ------------------------------------------------------------


async def test_json_body_is_accepted_and_stored(write_flow, client_factory, queue):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory()

    response = await client.post("/hooks/orders", json={"order": 42, "items": ["a", "b"]})

    assert response.status == 202
    body = await response.json()
    execution_id = body["execution_id"]
    assert body["duplicate"] is False
    stored = await queue.get(execution_id)
    assert stored is not None
    meta, nodes = stored
    assert meta["flow"] == "orders"
    assert meta["status"] == "queued"
    assert meta["trigger"] == {"order": 42, "items": ["a", "b"]}
    assert nodes == {}
    assert await ready_ids(queue) == [execution_id]
    # the flow's YAML is kept so the execution can finish on this version after a reload
    assert await queue.flow_source("orders", meta["flow_version"]) is not None


async def test_form_body_is_accepted_as_a_flat_mapping(write_flow, client_factory, queue):
    write_flow("signup", {"type": "webhook"})
    client = await client_factory()

    response = await client.post("/hooks/signup", data={"name": "Ann Lee", "phone": "+14155550123", "empty": ""})

    assert response.status == 202
    assert response.request_info.headers["Content-Type"] == "application/x-www-form-urlencoded"
    execution_id = (await response.json())["execution_id"]
    meta, _ = await queue.get(execution_id)
    assert meta["trigger"] == {"name": "Ann Lee", "phone": "+14155550123", "empty": ""}
    assert await ready_ids(queue) == [execution_id]


async def test_an_empty_body_is_an_empty_payload(write_flow, client_factory, queue):
    write_flow("ping", {"type": "webhook"})
    client = await client_factory()

    response = await client.post("/hooks/ping")

    assert response.status == 202
    meta, _ = await queue.get((await response.json())["execution_id"])
    assert meta["trigger"] == {}


async def test_the_path_defaults_to_the_flow_name(write_flow, client_factory, queue):
    write_flow("default_path", {"type": "webhook"})
    write_flow("custom_path", {"type": "webhook", "path": "crm/leads"})
    client = await client_factory()

    by_name = await client.post("/hooks/default_path", json={})
    by_path = await client.post("/hooks/crm/leads", json={})
    # a flow with an explicit path does not also listen on its name
    not_by_name = await client.post("/hooks/custom_path", json={})

    assert by_name.status == 202
    assert by_path.status == 202
    assert not_by_name.status == 404
    flows = {(await queue.get(execution_id))[0]["flow"] for execution_id in await ready_ids(queue)}
    assert flows == {"default_path", "custom_path"}


@pytest.mark.parametrize(
    ("size", "chunked"),
    [(400, True), (600_000, False), (600_000, True)],
    ids=["small-chunked", "large-content-length", "large-chunked"],
)
async def test_a_body_under_the_limit_is_read_whole(write_flow, client_factory, queue, size, chunked):
    # the body arrives in several pieces (chunks, or TCP segments of a large one): all must be read
    write_flow("whole", {"type": "webhook"})
    client = await client_factory()
    body = json.dumps({"text": "x" * size}).encode()
    data: Any = chunks(body, max(50, size // 8)) if chunked else body

    response = await client.post("/hooks/whole", data=data, headers={"Content-Type": "application/json"})

    assert response.status == 202, await response.text()
    meta, _ = await queue.get((await response.json())["execution_id"])
    assert meta["trigger"] == {"text": "x" * size}


# --- webhooks: refused -------------------------------------------------------------


async def test_unknown_path_is_404(write_flow, client_factory, queue):
    write_flow("known", {"type": "webhook"})
    client = await client_factory()

    response = await client.post("/hooks/unknown", json={})

    assert response.status == 404
    assert "unknown" in (await response.json())["error"]
    assert await stored_count(queue) == (0, 0)


async def test_schema_errors_list_every_path(write_flow, client_factory, queue):
    schema = {
        "type": "object",
        "required": ["phone", "name"],
        "properties": {"phone": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    }
    write_flow("typed", {"type": "webhook", "schema": schema})
    client = await client_factory()

    response = await client.post("/hooks/typed", json={"phone": 5, "age": -1})

    assert response.status == 400
    errors = (await response.json())["errors"]
    # the missing `name`, `phone` of the wrong type and `age` below its minimum: all three reported
    assert sorted(error["path"] for error in errors) == ["$", "$.age", "$.phone"]
    assert any("'name' is a required property" in error["message"] for error in errors)
    assert await stored_count(queue) == (0, 0)

    valid = await client.post("/hooks/typed", json={"phone": "+1", "name": "Ann", "age": 3})
    assert valid.status == 202


@pytest.mark.parametrize(
    "body",
    [b'{"order": 42', b"not json", b"\xff\xfe{}"],
    ids=["truncated", "text", "not-utf8"],
)
async def test_invalid_json_is_400(write_flow, client_factory, queue, body):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory()

    response = await client.post("/hooks/orders", data=body, headers={"Content-Type": "application/json"})

    assert response.status == 400
    assert "JSON" in (await response.json())["error"]
    assert await stored_count(queue) == (0, 0)


@pytest.mark.parametrize("payload", [[1, 2], "text", 42, None], ids=["array", "string", "number", "null"])
async def test_a_json_body_that_is_not_an_object_is_400(write_flow, client_factory, queue, payload):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory()

    response = await client.post(
        "/hooks/orders", data=json.dumps(payload), headers={"Content-Type": "application/json"}
    )

    assert response.status == 400
    assert (await response.json())["errors"][0]["path"] == "$"
    assert await stored_count(queue) == (0, 0)


# --- webhooks: authentication --------------------------------------------------------


async def test_hmac_signature_of_the_raw_body(write_flow, client_factory, queue, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    write_flow("signed", {"type": "webhook", "secret_env": "HOOK_SECRET"})
    client = await client_factory()
    body = b'{"order": 42,  "spacing": "kept as sent"}'
    json_type = {"Content-Type": "application/json"}

    missing = await client.post("/hooks/signed", data=body, headers=json_type)
    wrong = await client.post("/hooks/signed", data=body, headers={**json_type, "X-FlowChat-Signature": sign(b"{}")})
    wrong_key = await client.post(
        "/hooks/signed", data=body, headers={**json_type, "X-FlowChat-Signature": sign(body, "other")}
    )
    assert (missing.status, wrong.status, wrong_key.status) == (401, 403, 403)
    assert await stored_count(queue) == (0, 0)

    valid = await client.post("/hooks/signed", data=body, headers={**json_type, "X-FlowChat-Signature": sign(body)})
    assert valid.status == 202
    meta, _ = await queue.get((await valid.json())["execution_id"])
    assert meta["trigger"] == {"order": 42, "spacing": "kept as sent"}
    assert await stored_count(queue) == (1, 1)


async def test_hmac_with_the_secret_unset_is_503_and_accepts_nothing(write_flow, client_factory, queue, monkeypatch):
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    write_flow("signed", {"type": "webhook", "secret_env": "HOOK_SECRET"})
    client = await client_factory()
    body = b'{"order": 42}'

    response = await client.post(
        "/hooks/signed",
        data=body,
        headers={"Content-Type": "application/json", "X-FlowChat-Signature": sign(body, "")},
    )

    assert response.status == 503
    assert "HOOK_SECRET" in (await response.json())["error"]
    assert await stored_count(queue) == (0, 0)


async def test_webhook_secrets_come_from_the_settings_not_the_live_environment(
    write_flow, flows_dir, catalog_factory, queue, monkeypatch
):
    """A flow's ``secret_env`` is read from the Settings the app was made with (the daemon's, read at start)."""
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    write_flow("signed", {"type": "webhook", "secret_env": "HOOK_SECRET"})
    settings = Settings.from_env({"HOOK_SECRET": SECRET})
    client = TestClient(TestServer(create_app(queue, catalog_factory(flows_dir), Metrics(), settings=settings)))
    await client.start_server()
    try:
        body = b'{"order": 42}'
        headers = {"Content-Type": "application/json", "X-FlowChat-Signature": sign(body)}
        assert (await client.post("/hooks/signed", data=body, headers=headers)).status == 202
        monkeypatch.setenv("HOOK_SECRET", "changed-after-start")
        assert (await client.post("/hooks/signed", data=body, headers=headers)).status == 202
    finally:
        await client.close()


async def test_bearer_token(write_flow, client_factory, queue, monkeypatch):
    monkeypatch.setenv("HOOK_TOKEN", TOKEN)
    write_flow("tokened", {"type": "webhook", "token_env": "HOOK_TOKEN"})
    client = await client_factory()

    missing = await client.post("/hooks/tokened", json={"a": 1})
    basic = await client.post("/hooks/tokened", json={"a": 1}, headers={"Authorization": f"Basic {TOKEN}"})
    wrong = await client.post("/hooks/tokened", json={"a": 1}, headers={"Authorization": "Bearer nope"})
    assert (missing.status, basic.status, wrong.status) == (401, 401, 403)
    assert await stored_count(queue) == (0, 0)

    right = await client.post("/hooks/tokened", json={"a": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status == 202
    assert await stored_count(queue) == (1, 1)


async def test_bearer_token_with_the_token_unset_is_503(write_flow, client_factory, queue, monkeypatch):
    monkeypatch.delenv("HOOK_TOKEN", raising=False)
    write_flow("tokened", {"type": "webhook", "token_env": "HOOK_TOKEN"})
    client = await client_factory()

    response = await client.post("/hooks/tokened", json={}, headers={"Authorization": "Bearer "})

    assert response.status == 503
    assert await stored_count(queue) == (0, 0)


# --- webhooks: body size -------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("max_body", [None, 100], ids=["default-1MiB", "max_body-100"])
async def test_a_body_over_the_limit_is_413(write_flow, client_factory, queue, max_body, chunked):
    trigger: dict[str, Any] = {"type": "webhook"}
    if max_body is not None:
        trigger["max_body"] = max_body
    write_flow("limited", trigger)
    client = await client_factory()
    limit = max_body or 1024 * 1024
    body = json.dumps({"text": "x" * limit}).encode()  # just over the limit
    assert limit < len(body) < limit + 100
    data: Any = chunks(body, max(16, limit // 4)) if chunked else body

    response = await client.post("/hooks/limited", data=data, headers={"Content-Type": "application/json"})

    assert response.status == 413
    if chunked:
        assert "Content-Length" not in response.request_info.headers
        assert response.request_info.headers["Transfer-Encoding"] == "chunked"
    else:
        assert response.request_info.headers["Content-Length"] == str(len(body))
    assert await stored_count(queue) == (0, 0)


async def test_a_chunked_form_body_over_the_limit_is_not_accepted_truncated(write_flow, client_factory, queue):
    write_flow("limited", {"type": "webhook", "max_body": 100})
    client = await client_factory()
    body = ("a=" + "x" * 40 + "&b=" + "y" * 200).encode()

    response = await client.post(
        "/hooks/limited", data=chunks(body, 40), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )

    assert response.status == 413
    assert await stored_count(queue) == (0, 0)


async def test_a_body_exactly_at_the_limit_is_accepted(write_flow, client_factory, queue):
    write_flow("limited", {"type": "webhook", "max_body": 100})
    client = await client_factory()
    body = json.dumps({"t": "y" * 91}).encode()
    assert len(body) == 100

    response = await client.post("/hooks/limited", data=body, headers={"Content-Type": "application/json"})

    assert response.status == 202
    assert await stored_count(queue) == (1, 1)


# --- webhooks: idempotency -----------------------------------------------------------


async def test_duplicate_deliveries_share_one_execution(write_flow, client_factory, queue):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory()

    first = await client.post("/hooks/orders", json={"n": 1}, headers={"Idempotency-Key": "delivery-1"})
    again = await client.post("/hooks/orders", json={"n": 1}, headers={"Idempotency-Key": "delivery-1"})
    third = await client.post("/hooks/orders", json={"n": 1}, headers={"Idempotency-Key": "delivery-1"})

    assert (first.status, again.status, third.status) == (202, 202, 202)
    first_body, again_body, third_body = await first.json(), await again.json(), await third.json()
    assert first_body["duplicate"] is False
    assert again_body == third_body == {"execution_id": first_body["execution_id"], "duplicate": True}
    assert await stored_count(queue) == (1, 1)


async def test_different_idempotency_keys_are_different_executions(write_flow, client_factory, queue):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory()

    one = await client.post("/hooks/orders", json={}, headers={"Idempotency-Key": "delivery-1"})
    two = await client.post("/hooks/orders", json={}, headers={"Idempotency-Key": "delivery-2"})
    unkeyed = [await client.post("/hooks/orders", json={}) for _ in range(2)]

    ids = {(await r.json())["execution_id"] for r in [one, two, *unkeyed]}
    assert len(ids) == 4
    assert await stored_count(queue) == (4, 4)


async def test_concurrent_duplicates_store_one_execution(write_flow, client_factory, queue):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory()

    responses = await asyncio.gather(
        *[client.post("/hooks/orders", json={}, headers={"Idempotency-Key": "same"}) for _ in range(10)]
    )

    bodies = [await response.json() for response in responses]
    assert {body["execution_id"] for body in bodies} == {bodies[0]["execution_id"]}
    assert sorted(body["duplicate"] for body in bodies) == [False] + [True] * 9
    assert await stored_count(queue) == (1, 1)


# --- Redis down ----------------------------------------------------------------------


async def test_redis_unreachable_is_503_and_nothing_is_stored(write_flow, client_factory, queue, unreachable_queue):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory(unreachable_queue)

    response = await client.post("/hooks/orders", json={"order": 1}, headers={"Idempotency-Key": "k"})

    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert "retry" in (await response.json())["error"]
    assert await stored_count(queue) == (0, 0)
    assert await queue.redis.keys("*dedupe*") == []


# --- Twilio --------------------------------------------------------------------------


def twilio_params(sid: str = "SM0001") -> dict[str, str]:
    return {
        "MessageSid": sid,
        "AccountSid": "AC123",
        "From": "whatsapp:+14155550123",
        "To": "whatsapp:+14155550100",
        "Body": "hello there & more",
        "NumMedia": "0",
    }


@pytest.fixture
async def twilio_client(write_flow, client_factory, monkeypatch) -> TestClient:
    write_flow("inbound", {"type": "twilio.message"})
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
    client = await client_factory()
    monkeypatch.setenv("FLOWCHAT_PUBLIC_URL", str(client.make_url("")).rstrip("/"))
    return client


def twilio_signature(client: TestClient, params: dict[str, str], token: str = TWILIO_TOKEN) -> str:
    url = str(client.make_url("/twilio/message"))
    return RequestValidator(token).compute_signature(url, params)


async def test_twilio_message_signed_by_twilio_is_accepted(twilio_client, queue):
    params = twilio_params()

    response = await twilio_client.post(
        "/twilio/message", data=params, headers={"X-Twilio-Signature": twilio_signature(twilio_client, params)}
    )

    assert response.status == 200
    assert response.content_type == "text/xml"
    assert "<Response>" in await response.text()
    [execution_id] = await ready_ids(queue)
    meta, _ = await queue.get(execution_id)
    assert meta["flow"] == "inbound"
    assert meta["trigger"] == {**params, "contact": {
        "phone": "+14155550123",
        "created": False,
        "consent": {"state": "unknown", "at": None, "source": None},
    }}


async def test_twilio_message_with_a_bad_signature_is_403(twilio_client, queue):
    params = twilio_params()
    forged = twilio_signature(twilio_client, params, token="not-the-token")
    tampered = twilio_signature(twilio_client, {**params, "Body": "something else"})

    bad = await twilio_client.post("/twilio/message", data=params, headers={"X-Twilio-Signature": forged})
    changed = await twilio_client.post("/twilio/message", data=params, headers={"X-Twilio-Signature": tampered})

    assert (bad.status, changed.status) == (403, 403)
    assert await stored_count(queue) == (0, 0)


async def test_twilio_message_without_a_signature_is_refused(twilio_client, queue):
    response = await twilio_client.post("/twilio/message", data=twilio_params())

    assert response.status in (401, 403)
    assert await stored_count(queue) == (0, 0)


async def test_the_same_message_sid_twice_is_one_execution(twilio_client, queue):
    params = twilio_params("SM-retried")
    headers = {"X-Twilio-Signature": twilio_signature(twilio_client, params)}
    other = twilio_params("SM-other")

    first = await twilio_client.post("/twilio/message", data=params, headers=headers)
    again = await twilio_client.post("/twilio/message", data=params, headers=headers)
    different = await twilio_client.post(
        "/twilio/message", data=other, headers={"X-Twilio-Signature": twilio_signature(twilio_client, other)}
    )

    assert (first.status, again.status, different.status) == (200, 200, 200)
    assert await stored_count(queue) == (2, 2)


# --- health and metrics ----------------------------------------------------------------


async def test_healthz(client_factory):
    client = await client_factory()

    response = await client.get("/healthz")

    assert response.status == 200


async def test_readyz_with_flows_loaded(write_flow, client_factory):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory()

    response = await client.get("/readyz")

    assert response.status == 200
    body = await response.json()
    assert body["ready"] is True
    assert body["flows"] == ["orders"]


async def test_readyz_with_no_flows_is_503(client_factory):
    client = await client_factory()

    response = await client.get("/readyz")

    assert response.status == 503
    assert (await response.json())["ready"] is False


async def test_readyz_with_redis_unreachable_is_503(write_flow, client_factory, unreachable_queue):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory(unreachable_queue)

    response = await client.get("/readyz")

    assert response.status == 503
    assert any("redis" in problem for problem in (await response.json())["problems"])
    assert (await client.get("/healthz")).status == 200


async def test_metrics_count_requests_by_route_and_status(write_flow, client_factory, queue):
    write_flow("orders", {"type": "webhook"})
    client = await client_factory()
    for _ in range(2):
        await client.post("/hooks/orders", json={})
    await client.post("/hooks/nowhere", json={})
    await client.post("/hooks/orders", data=b"[", headers={"Content-Type": "application/json"})

    response = await client.get("/metrics")

    assert response.status == 200
    assert response.content_type == "text/plain"
    samples = parse_metrics(await response.text())
    requests = {
        (labels["route"], labels["status"]): value
        for name, labels, value in samples
        if name == "flowchat_ingress_requests_total"
    }
    assert requests[("/hooks/{path}", "202")] == 2
    assert requests[("/hooks/{path}", "404")] == 1
    assert requests[("/hooks/{path}", "400")] == 1
    depth = {labels["state"]: value for name, labels, value in samples if name == "flowchat_queue_depth"}
    assert depth == {"ready": 2, "in_flight": 0, "delayed": 0}


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def test_each_twilio_flow_is_reached_only_with_its_own_account_s_signature(
    write_flow, client_factory, queue, monkeypatch
):
    write_flow("ours", {"type": "twilio.message"})
    write_flow("theirs", {"type": "twilio.message", "auth_token_env": "OTHER_TWILIO_TOKEN"})
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("OTHER_TWILIO_TOKEN", "another-account-token")
    client = await client_factory()
    monkeypatch.setenv("FLOWCHAT_PUBLIC_URL", str(client.make_url("")).rstrip("/"))
    params = twilio_params("SM-ours")

    response = await client.post(
        "/twilio/message", data=params, headers={"X-Twilio-Signature": twilio_signature(client, params)}
    )

    assert response.status == 200
    flows = [(await queue.get(execution_id))[0]["flow"] for execution_id in await ready_ids(queue)]
    assert flows == ["ours"]
