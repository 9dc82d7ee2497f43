"""HTTP ingress: authenticate, validate, deduplicate, enqueue, answer. It never runs a flow.

Routes (a contract):

- ``POST /hooks/{path}``: webhook triggers. JSON or form body; ``202 {"execution_id": …}``.
- ``POST /twilio/message`` and ``POST /twilio/status``: Twilio webhooks, signature-checked.
- ``GET /healthz`` (alive), ``GET /readyz`` (Redis reachable, flows loaded), ``GET /metrics``.

If Redis cannot store an execution the answer is 503, so the caller retries:
nothing is accepted that was not stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from flowchat.access_log import access_log
from flowchat.backoff import REDIS
from flowchat.catalog import Catalog
from flowchat.errors import QueueError
from flowchat.flow import Flow
from flowchat.metrics import Metrics
from flowchat.payloads import PayloadError, check_header, parse_payload
from flowchat.queue import Queue
from flowchat.settings import Settings
from flowchat.twilio_webhooks import (
    TWIML_EMPTY,
    TwilioWebhooks,
    addressed_to,
    advance_status,
    read_form,
    record_in_ledger,
    record_on_contact,
    route,
    signed_flows,
)

log = logging.getLogger("flowchat.ingress")
SIGNATURE_HEADER = "X-FlowChat-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_TWILIO_BODY = 1024 * 1024
QUEUE_KEY = web.AppKey("queue", Queue)
CATALOG_KEY = web.AppKey("catalog", Catalog)
METRICS_KEY = web.AppKey("metrics", Metrics)
TWILIO_KEY = web.AppKey("twilio", TwilioWebhooks)
SETTINGS_KEY = web.AppKey("settings", Settings)


class HttpProblem(Exception):
    """An answer other than success, with a JSON body naming what is wrong."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": message, **extra}


def create_app(
    queue: Queue,
    catalog: Catalog,
    metrics: Metrics,
    twilio: TwilioWebhooks | None = None,
    *,
    settings: Settings | None = None,
) -> web.Application:
    """The ingress routes. Without ``settings`` they are read from the environment now, once (like the
    daemon's): the variables flows name for their webhook secrets included."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[access_log, _count_requests])
    app[QUEUE_KEY], app[CATALOG_KEY], app[METRICS_KEY] = queue, catalog, metrics
    app[SETTINGS_KEY] = settings or Settings.from_env()
    app[TWILIO_KEY] = twilio or TwilioWebhooks()
    app.router.add_post("/hooks/{path:.+}", webhook)
    app.router.add_post("/twilio/message", twilio_message)
    app.router.add_post("/twilio/status", twilio_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except HttpProblem as problem:
        response = web.json_response(problem.body, status=problem.status)
    except PayloadError as bad:
        errors = [{"path": bad.path, "message": bad.message}]
        response = web.json_response({"error": bad.message, "errors": errors}, status=bad.status)
    except (QueueError, RedisError, OSError) as exc:
        REDIS.failed(f"ingress: {exc}", 1.0)  # once per outage; each refused request is in the access log
        response = web.json_response(
            {"error": "queue unavailable, retry later"}, status=503, headers={"Retry-After": "1"}
        )
    except web.HTTPException as exc:
        response = web.json_response({"error": exc.reason}, status=exc.status)
    except Exception:  # a bug: answered and counted like any other status, with its traceback in the log
        log.exception("unexpected error answering %s %s", request.method, route)
        response = web.json_response({"error": "internal error"}, status=500)
    request.app[METRICS_KEY].ingress.labels(route, str(response.status)).inc()
    return response


# --- webhooks -----------------------------------------------------------------------


async def webhook(request: web.Request) -> web.Response:
    path = request.match_info["path"]
    flow = request.app[CATALOG_KEY].webhook(path)
    if flow is None:
        raise HttpProblem(404, f"no flow listens on /hooks/{path}")
    trigger = flow.trigger
    idempotency_key = check_header(IDEMPOTENCY_HEADER, request.headers.get(IDEMPOTENCY_HEADER), 256)
    raw = await _read_body(request, trigger.max_body)
    _authenticate(request, raw, trigger.secret_env, trigger.token_env)
    payload = parse_payload(raw, request.content_type)
    if trigger.schema_ is not None:
        _check_schema(flow, payload)
    execution_id, created = await _enqueue(request, flow, payload, idempotency_key)
    return web.json_response({"execution_id": execution_id, "duplicate": not created}, status=202)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (413), arriving within the body timeout (408)."""
    if request.content_length is not None and request.content_length > limit:
        raise HttpProblem(413, f"body of {request.content_length} bytes is over the limit of {limit}")
    content = request.content
    if content.is_eof():  # already all here (a small request arrives with its headers): no timer to arm
        raw = content.read_nowait(limit + 1)
        if len(raw) > limit:
            raise HttpProblem(413, f"body is over the limit of {limit} bytes")
        return raw
    timeout = request.app[SETTINGS_KEY].body_timeout
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.read(limit + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise HttpProblem(413, f"body is over the limit of {limit} bytes")
    except TimeoutError:
        raise HttpProblem(408, f"body not received within {timeout:g}s") from None
    return b"".join(chunks)


def _authenticate(request: web.Request, raw: bytes, secret_env: str | None, token_env: str | None) -> None:
    settings = request.app[SETTINGS_KEY]
    if secret_env:
        secret = _secret(settings, secret_env)
        given = _credential(request, SIGNATURE_HEADER)
        if not given:
            raise HttpProblem(401, f"missing {SIGNATURE_HEADER} header (sha256=<hex HMAC of the body>)")
        expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise HttpProblem(403, f"{SIGNATURE_HEADER} does not match the body")
    if token_env:
        token = _secret(settings, token_env)
        header = _credential(request, "Authorization") or ""
        if not header.startswith("Bearer "):
            raise HttpProblem(401, "missing Authorization: Bearer <token> header")
        if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
            raise HttpProblem(403, "bearer token is not valid")


def _credential(request: web.Request, name: str) -> str | None:
    """A credential header; one that is not UTF-8 text cannot match, so the caller is not authenticated (401)."""
    try:
        return check_header(name, request.headers.get(name), 4096)
    except PayloadError as bad:
        raise HttpProblem(401, bad.message) from None


def _secret(settings: Settings, env_name: str) -> str:
    """The value of the variable a flow names (``secret_env``, ``token_env``), as the process started with it."""
    value = settings.env(env_name)
    if not value:
        log.error("environment variable %s is not set; refusing requests to its webhook", env_name)
        raise HttpProblem(503, f"webhook authentication is not configured (set {env_name})")
    return value


def _check_schema(flow: Flow, payload: dict[str, Any]) -> None:
    validator = flow.trigger_validator
    assert validator is not None
    errors = sorted(validator.iter_errors(payload), key=lambda e: e.json_path)
    if errors:
        listed = [{"path": error.json_path, "message": error.message} for error in errors]
        raise HttpProblem(400, f"payload does not match the trigger schema ({len(errors)} error(s))", errors=listed)


async def _enqueue(
    request: web.Request, flow: Flow, payload: dict[str, Any], idempotency_key: str | None
) -> tuple[str, bool]:
    queue = request.app[QUEUE_KEY]
    await queue.store_flow(flow)
    return await queue.enqueue(flow.name, flow.version, payload, idempotency_key=idempotency_key)


# --- Twilio (see flowchat.twilio_webhooks) -----------------------------------------------


async def twilio_message(request: web.Request) -> web.Response:
    hooks = request.app[TWILIO_KEY]
    settings = hooks.settings
    _credential(request, "X-Twilio-Signature")
    form = read_form(await _read_body(request, MAX_TWILIO_BODY))
    params = form.params
    flows = [flow for flow in request.app[CATALOG_KEY].by_trigger("twilio.message") if addressed_to(flow, params)]
    started = route(signed_flows(request, form, flows, hooks, settings), params)
    contact = await _record_inbound(hooks, request.app[QUEUE_KEY], params)
    trigger = {**params, "contact": contact}
    sid = params.get("MessageSid") or None
    if len(started) == 1:  # inline: its command joins the events' batch
        await _enqueue(request, started[0], trigger, sid)
    elif started:
        await asyncio.gather(*(_enqueue(request, flow, trigger, sid) for flow in started))
    return web.Response(text=TWIML_EMPTY, content_type="text/xml")


async def _record_inbound(hooks: TwilioWebhooks, queue: Queue, params: dict[str, str]) -> dict[str, Any]:
    """The inbound in the ledger and on its contact, in one round trip; ``trigger.contact``.

    The ledger's command goes first (its task runs before this coroutine resumes from the
    sleep), so its answer is handled, and its event emitted, before the contact's answer
    resumes this coroutine, and the caller's enqueue is issued in that same loop turn: it
    leaves in one round trip with both events (a test counts them).
    """
    ledger = asyncio.create_task(record_in_ledger(hooks, queue.keys, queue.redis, params))
    ledger.add_done_callback(_retrieved)
    await asyncio.sleep(0)
    contact = await record_on_contact(hooks, params)
    await ledger  # recorded before anything is enqueued (already done, unless Redis had to reload its script)
    return contact


def _retrieved(task: asyncio.Future[None]) -> None:
    """Mark a side task's failure as seen when the request already failed on its own (no 'never retrieved' log)."""
    if not task.cancelled():
        task.exception()


async def twilio_status(request: web.Request) -> web.Response:
    hooks, settings = request.app[TWILIO_KEY], request.app[TWILIO_KEY].settings
    _credential(request, "X-Twilio-Signature")
    form = read_form(await _read_body(request, MAX_TWILIO_BODY))
    params = form.params
    flows = signed_flows(request, form, request.app[CATALOG_KEY].by_trigger("twilio.status"), hooks, settings)
    queue = request.app[QUEUE_KEY]
    message = await advance_status(hooks, queue.keys, queue.redis, params)
    if message is not None:
        status = params.get("MessageStatus", "").lower()
        trigger = {**params, "message": message}
        for flow in flows:
            wanted = getattr(flow.trigger, "match", None)
            if wanted is None or status in wanted.status:
                await _enqueue(request, flow, trigger, f"{params.get('MessageSid')}:{status}")
    return web.Response(text=TWIML_EMPTY, content_type="text/xml")


# --- health and metrics ---------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


READY_TIMEOUT = 1.0
"""Seconds ``/readyz`` waits for Redis before answering 503 (a paused Redis does not hang it)."""


async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis accepts a write within READY_TIMEOUT (not OOM, not a read-only replica) and flows are loaded."""
    catalog = request.app[CATALOG_KEY]
    problems: list[str] = []
    redis_problem = await _redis_refuses_writes(request.app[QUEUE_KEY])
    if redis_problem:
        problems.append(redis_problem)
    if not catalog.by_file:
        problems.append(f"no flows loaded from {catalog.folder}")
    status = 503 if problems else 200
    return web.json_response(
        {"ready": not problems, "problems": problems, "flows": sorted(catalog.flows)}, status=status
    )


async def _redis_refuses_writes(queue: Queue) -> str | None:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await queue.redis.set(queue.keys.ready_probe, b"1", px=5000)
    except TimeoutError:
        return f"redis did not answer within {READY_TIMEOUT:g}s"
    except RedisError as exc:
        return f"redis refuses writes: {exc}"
    except OSError as exc:
        return f"redis unreachable: {exc}"
    return None


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    try:
        metrics.set_queue(await request.app[QUEUE_KEY].stats())
    except (RedisError, OSError) as exc:
        log.warning("queue depths unavailable for /metrics: %s", exc)
    return web.Response(
        body=metrics.render(), content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )
