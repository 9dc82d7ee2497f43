"""The WhatsApp sender (service ``whatsapp``): consent, the 24-hour window, pacing, Twilio, the ledger.

One send is: already sent by this node? → consent → session window (or the
template) → pacing → Twilio (or the outbox) → ledger → event. Every refusal
before Twilio makes no API call.

- **Outbox mode.** Without ``TWILIO_ACCOUNT_SID`` and ``TWILIO_AUTH_TOKEN`` nothing
  is sent: each message is recorded with status ``simulated`` and logged with the
  phone masked, so the whole product runs without an account.
- **Errors.** 429, 5xx and Twilio codes 20429, 63018, 30001, 30003, 30008 are
  retryable (``Retry-After`` honoured); 21211, 21408, 21610, 21614, 63016, 63024,
  63032 and other 4xx fail at once. Twilio's code is kept as ``twilio-<code>``.
  21610 also opts the contact out. A request that times out is retryable but
  ambiguous (Twilio may have accepted it): the retry may send a second message.
- **Pacing.** Per sender (``FLOWCHAT_SEND_RATE``) and per recipient
  (``FLOWCHAT_RECIPIENT_RATE``) through the ``limiter`` service; a paced send
  raises :class:`~flowchat.node.Suspend`, so the execution is parked in Redis and
  no worker sleeps. A recipient slot already granted to this node is remembered,
  so a send deferred by the sender limit does not spend a second recipient slot.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
import types
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from flowchat.errors import NodeError
from flowchat.keys import Keys
from flowchat.logs import mask_phones
from flowchat.messages import Ledger, SentBy
from flowchat.node import Suspend
from flowchat.settings import Settings

log = logging.getLogger("flowchat.whatsapp")

SESSION_WINDOW = 24 * 3600.0
RETRYABLE_CODES = frozenset({20429, 63018, 30001, 30003, 30008})
PERMANENT_CODES = frozenset({21211, 21408, 21610, 21614, 63016, 63024, 63032})
_NOBODY = SentBy()
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


@dataclass(frozen=True, slots=True)
class Template:
    """An approved WhatsApp template: Twilio Content ``HX…`` sid and its variables."""

    content_sid: str
    variables: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to send. ``to`` and ``from_`` are E.164 numbers (a ``whatsapp:`` prefix is dropped)."""

    to: str
    body: str | None = None
    media: tuple[str, ...] = ()
    template: Template | None = None
    from_: str = ""


@dataclass(frozen=True, slots=True)
class Rate:
    """``80/1s``: at most ``limit`` per ``per`` seconds."""

    limit: int
    per: float

    @classmethod
    def parse(cls, text: str, name: str) -> Rate | None:
        from flowchat.durations import parse_duration

        if text.strip().lower() == "off":
            return None
        count, _, period = text.partition("/")
        try:
            rate = cls(int(count), parse_duration(period.strip() or "1s"))
        except ValueError:
            raise NodeError(f"{name}={text!r} is not a rate like 80/1s or off", code="settings-invalid") from None
        if rate.limit < 1 or rate.per <= 0:
            raise NodeError(f"{name}={text!r} must allow at least 1 per a positive period", code="settings-invalid")
        return rate


def whatsapp_address(phone: str) -> str:
    return f"whatsapp:{phone}"


def e164(raw: str, what: str) -> str:
    """``raw`` as E.164 (``whatsapp:`` and spaces dropped), else a permanent ``invalid-phone`` error."""
    try:
        from flowchat.phones import normalize  # the CRM's parser, when installed

        return str(normalize(raw))
    except ImportError:
        pass
    phone = re.sub(r"[\s().-]", "", raw.removeprefix("whatsapp:"))
    if not _E164.match(phone):
        raise NodeError(f"{what} {mask_phones(raw)!r} is not an E.164 number like +14155550100", code="invalid-phone")
    return phone


class WhatsApp:
    """Sends WhatsApp messages through Twilio, or records them in outbox mode."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis: Redis | None = None,
        keys: Keys | None = None,
        contacts: Any = None,
        limiter: Any = None,
        events: Any = None,
        services: Any = None,
    ) -> None:
        self.settings = settings
        self.outbox = not (settings.twilio_account_sid and settings.twilio_auth_token)
        self.ledger = Ledger(redis, keys) if redis is not None else None
        self.redis, self.keys = redis, keys or Keys()
        self._given = {"contacts": contacts, "limiter": limiter, "events": events}
        self._services = services
        self.send_rate = Rate.parse(settings.send_rate, "FLOWCHAT_SEND_RATE")
        self.recipient_rate = Rate.parse(settings.recipient_rate, "FLOWCHAT_RECIPIENT_RATE")
        self._client: Any = None
        self._http: Any = None

    def _service(self, name: str) -> Any:
        given = self._given.get(name)
        if given is not None or self._services is None:
            return given
        return getattr(self._services, "extra", {}).get(name)

    @property
    def contacts(self) -> Any:
        return self._service("contacts")

    @property
    def limiter(self) -> Any:
        return self._service("limiter")

    @property
    def events(self) -> Any:
        return self._service("events")

    @property
    def mode(self) -> str:
        return (
            "outbox (no TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN: messages are recorded, not sent)"
            if self.outbox
            else (f"twilio ({self.settings.twilio_api_url or 'https://api.twilio.com'})")
        )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- one send -------------------------------------------------------------------

    async def send(
        self,
        *,
        to: str,
        body: str | None = None,
        media: list[str] | tuple[str, ...] = (),
        template: dict[str, Any] | None = None,
        from_: str = "",
        flow: str = "",
        execution: str = "",
        node: str = "",
        first_run: bool = False,
    ) -> dict[str, Any]:
        """Send one message, once per (execution, node); returns ``{sid, status, to, used_template}``.

        ``template`` is ``{"content_sid": "HX…", "variables": {...}}``; the plain-arguments form
        is what nodes call (``ctx.services.get("whatsapp").send(...)``). ``first_run`` (the node's
        :attr:`~flowchat.node.NodeContext.first_run`) skips looking for an earlier send of it.
        """
        chosen = None
        if template is not None:
            variables = {str(k): str(v) for k, v in (template.get("variables") or {}).items()}
            chosen = Template(str(template["content_sid"]), variables)
        message = Outgoing(to=to, body=body, media=tuple(media), template=chosen, from_=from_)
        return await self.deliver(message, SentBy(flow, execution, node), first_run=first_run)

    async def deliver(self, message: Outgoing, by: SentBy = _NOBODY, *, first_run: bool = False) -> dict[str, Any]:
        """Send ``message`` once per (execution, node); output ``{sid, status, to, used_template}``."""
        to = e164(message.to, "to")
        sender = self._sender(message)
        if first_run:  # nothing can have been sent by this node yet
            contact = await self._contact(to)
        else:  # one round trip for both: did this node send already, and who is the contact
            done, contact = await asyncio.gather(self._sent(by), self._contact(to))
            if done is not None:
                return {**done, "to": done.get("to") or to}
        _check_consent(contact, to)
        message = self._fit_window(message, contact, to)
        await self._pace(sender, to, by)
        if self.outbox:
            result = self._simulate(message, to, sender)
        else:
            result = await self._post(message, to, sender)
        output = _output(result["sid"], result["status"], to, message.template is not None)
        await self._record(result, message, to, sender, by, output)
        return output

    def _sender(self, message: Outgoing) -> str:
        raw = message.from_ or self.settings.twilio_whatsapp_number
        if raw:
            return e164(raw, "from")
        if not self.outbox:
            raise NodeError(
                "no sender number: set TWILIO_WHATSAPP_NUMBER or the node's `from`", code="whatsapp-sender-missing"
            )
        return ""

    async def _sent(self, by: SentBy) -> dict[str, Any] | None:
        if self.ledger is None or not by.execution:
            return None
        return await self.ledger.sent(by.execution, by.node)

    async def _contact(self, phone: str) -> dict[str, Any] | None:
        if self.contacts is None:
            return None
        found: dict[str, Any] | None = await self.contacts.get(phone)
        return found

    def _fit_window(self, message: Outgoing, contact: dict[str, Any] | None, to: str) -> Outgoing:
        """Free-form inside the 24-hour window; the template outside it; refused when there is none."""
        free_form = message.body is not None or bool(message.media)
        if not free_form or self.contacts is None:
            return message
        last = _epoch_seconds((contact or {}).get("last_inbound_at"))
        if last is not None and time.time() - last < SESSION_WINDOW:
            return Outgoing(to=message.to, body=message.body, media=message.media, from_=message.from_)
        if message.template is not None:
            return Outgoing(to=message.to, template=message.template, from_=message.from_)
        when = "never wrote" if last is None else f"last wrote {(time.time() - last) / 3600:.0f}h ago"
        raise NodeError(
            f"{mask_phones(to)} {when}: a free-form message is only allowed within 24 hours of their last "
            "message; give the node a `template` (content_sid + variables) to use outside the window",
            code="outside-session-window",
        )

    async def _pace(self, sender: str, to: str, by: SentBy) -> None:
        """Take a slot per recipient, then per sender; a refusal parks the execution until its reserved slot."""
        if self.limiter is None:
            return
        granted = self._pace_record(by)
        holder = f"{by.execution}:{by.node}" if by.execution else None
        line = sender or "outbox"
        if self.recipient_rate is not None and not (granted and await self._granted(granted)):
            rate = self.recipient_rate
            decision = await self.limiter.acquire(f"wa:to:{line}:{to}", rate.limit, rate.per, 1, holder=holder)
            if not decision.allowed:
                raise Suspend(time.time() + decision.retry_after_ms / 1000)
            if granted:  # a later refusal by the sender limit must not spend a second recipient slot
                await self._grant(granted)
        if self.send_rate is not None:
            rate = self.send_rate
            # burst 1: sends are spaced evenly, so no second ever carries more than the rate (Twilio
            # queues what exceeds a sender's throughput, and a queued message can expire)
            decision = await self.limiter.acquire(f"wa:from:{line}", rate.limit, rate.per, 1, holder=holder)
            if not decision.allowed:
                raise Suspend(time.time() + decision.retry_after_ms / 1000)

    def _pace_record(self, by: SentBy) -> str:
        return f"{self.keys.send_record(by.execution, by.node)}:paced" if by.execution and self.redis else ""

    async def _granted(self, key: str) -> bool:
        assert self.redis is not None
        return bool(await self.redis.exists(key))

    async def _grant(self, key: str) -> None:
        assert self.redis is not None
        await self.redis.set(key, "1", ex=3600)

    # --- outbox and Twilio ------------------------------------------------------------

    def _simulate(self, message: Outgoing, to: str, sender: str) -> dict[str, Any]:
        # outbox sids need only be unique, not unguessable: no system call per sid (random reseeds after fork)
        sid = f"SM{random.getrandbits(128):032x}"
        if log.isEnabledFor(logging.INFO):
            what = f"template {message.template.content_sid}" if message.template else f"{len(message.body or '')} chars"
            log.info("outbox: %s -> %s (%s, %d media) recorded as %s, not sent", mask_phones(sender), mask_phones(to),
                     what, len(message.media), sid)  # fmt: skip
        return {"sid": sid, "status": "simulated"}

    async def _post(self, message: Outgoing, to: str, sender: str) -> dict[str, Any]:
        from twilio.base.exceptions import TwilioException

        from flowchat.twilio_http import capture_responses

        client = self._twilio()
        responses = capture_responses()
        try:
            async with asyncio.timeout(self.settings.twilio_timeout):
                created = await client.messages.create_async(**_create_args(message, to, sender, self._callback()))
        except TimeoutError as exc:
            raise NodeError(
                f"Twilio did not answer within {self.settings.twilio_timeout:g}s (the message may have been sent)",
                code="twilio-timeout",
                retryable=True,
            ) from exc
        except TwilioException as exc:
            error = twilio_error(exc, responses[-1].headers if responses else None)
            if error.code == "twilio-21610":
                await self._opt_out(to)
            raise error from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise NodeError(f"cannot reach Twilio: {exc}", code="twilio-unreachable", retryable=True) from exc
        return {"sid": created.sid, "status": created.status or "queued"}

    def _twilio(self) -> Any:
        """The twilio Client, built on first use inside the running loop."""
        if self._client is None:
            from twilio.rest import Client

            from flowchat.twilio_http import TwilioHttp

            self._http = TwilioHttp(self.settings.twilio_api_url, self.settings.twilio_timeout)
            self._client = Client(
                self.settings.twilio_account_sid,
                self.settings.twilio_auth_token,
                http_client=self._http,
                environment={},  # never TWILIO_EDGE/REGION from the environment: settings decide
            )
        return self._client

    def _callback(self) -> str | None:
        return f"{self.settings.public_url}/twilio/status" if self.settings.public_url else None

    async def _opt_out(self, phone: str) -> None:
        if self.contacts is not None:
            await self.contacts.set_consent(phone, "opted_out", "twilio-21610")

    async def _record(
        self, result: dict[str, Any], message: Outgoing, to: str, sender: str, by: SentBy, output: dict[str, Any]
    ) -> None:
        fields = {
            "sid": result["sid"],
            "status": result["status"],
            "to": to,
            "from": sender,
            "body": message.body or "",
            "template": message.template is not None,
            "content_sid": message.template.content_sid if message.template else "",
            "num_media": len(message.media),
        }
        try:
            if self.ledger is not None:
                await self.ledger.record_send(fields, by, output)
            emit_message(self.events, by, sid=result["sid"], direction="outbound", phone=to,
                         status=result["status"], error_code="", template=message.template is not None)  # fmt: skip
        except RedisError as exc:
            # Twilio took the message: failing now would send it again on retry; say so loudly instead
            log.error("message %s was sent but could not be recorded: %s", result["sid"], exc)


def twilio_error(exc: Exception, headers: Any) -> NodeError:
    """A twilio exception as a FlowChat error: ``twilio-<code>``, retryable or not, ``Retry-After`` kept."""
    status = int(getattr(exc, "status", 0) or 0)
    code = getattr(exc, "code", None)
    text = str(getattr(exc, "msg", None) or getattr(exc, "detail", None) or getattr(exc, "title", None) or exc)
    numeric = int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else None
    if numeric in PERMANENT_CODES:
        retryable = False
    elif numeric in RETRYABLE_CODES or status == 429 or status >= 500:
        retryable = True
    else:
        retryable = False
    name = f"twilio-{numeric}" if numeric and numeric != status else f"twilio-http-{status}"
    return NodeError(text, code=name, retryable=retryable, retry_after=retry_after(headers))


def retry_after(headers: Any) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    value = None
    if headers:
        value = next((v for k, v in dict(headers).items() if k.lower() == "retry-after"), None)
    if not value:
        return None
    value = str(value).strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _create_args(message: Outgoing, to: str, sender: str, callback: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"to": whatsapp_address(to)}
    if sender:
        args["from_"] = whatsapp_address(sender)
    if message.template is not None:
        args["content_sid"] = message.template.content_sid
        if message.template.variables:
            args["content_variables"] = json.dumps(message.template.variables, ensure_ascii=False)
    else:
        if message.body is not None:
            args["body"] = message.body
        if message.media:
            args["media_url"] = list(message.media)
    if callback:
        args["status_callback"] = callback
    return args


def emit_message(events: Any, by: SentBy, **data: Any) -> None:
    """A ``message`` event (sid, direction, phone, status, error_code, template) on the events stream."""
    if events is not None:
        origin = types.SimpleNamespace(flow=by.flow, execution_id=by.execution, node_id=by.node)
        events.emit("message", origin, data)


def consent_state(contact: dict[str, Any] | None) -> str:
    """``opted_in``, ``opted_out`` or ``unknown`` from a contact (its ``consent`` is a dict or a state)."""
    consent = (contact or {}).get("consent")
    state = consent.get("state") if isinstance(consent, dict) else consent
    return str(state or "unknown")


def _check_consent(contact: dict[str, Any] | None, to: str) -> None:
    if consent_state(contact) == "opted_out":
        raise NodeError(
            f"{mask_phones(to)} opted out of messages (they can send START to opt back in)", code="contact-opted-out"
        )


def _epoch_seconds(value: Any) -> float | None:
    """A stored time (epoch ms or s, or ISO 8601) as epoch seconds."""
    if value in (None, ""):
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and value.replace(".", "", 1).isdigit()):
        number = float(value)
        return number / 1000 if number > 10**11 else number
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def _output(sid: str, status: str, to: str, used_template: bool) -> dict[str, Any]:
    return {"sid": sid, "status": status, "to": to, "used_template": used_template}


async def open_whatsapp(settings: Settings, services: Any = None) -> WhatsApp:
    """The ``whatsapp`` service factory (entry point ``flowchat.services``).

    The CRM's ``contacts``, ``limiter`` and ``events`` are looked up on first use, so the
    order services start in does not matter.
    """
    sender = WhatsApp(
        settings, redis=getattr(services, "redis", None), keys=getattr(services, "keys", None), services=services
    )
    log.info("whatsapp: %s", sender.mode)
    return sender
