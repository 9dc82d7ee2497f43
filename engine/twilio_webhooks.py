"""``POST /twilio/message`` and ``POST /twilio/status``: Twilio's webhooks (routes are a contract).

Both check ``X-Twilio-Signature`` (twilio's RequestValidator algorithm, every received
field, :class:`~flowchat.twilio_auth.SignatureCheck`) against
``FLOWCHAT_PUBLIC_URL`` + path + query when that is set, with ``TWILIO_AUTH_TOKEN``
or, in outbox mode, the local signing token (:mod:`flowchat.twilio_auth`); a flow
with its own ``auth_token_env`` is reached only with that account's signature.
A missing or bad signature is 403 and nothing is stored. Unknown fields are kept.

- **message**: the inbound is recorded on its contact (upsert, last inbound time,
  profile name, consent keywords; idempotent per ``MessageSid``) and in the message
  ledger before the flows are enqueued, and the flows get
  ``trigger.contact = {phone, created, consent}``. Two Redis round trips: the contact
  and ledger writes, then the enqueue with the contact and message events (the
  enqueue needs the contact's answer; they live under different hash tags).
  Every ``twilio.message`` flow whose ``match:`` fits starts (flows without
  ``match:`` always do; ``match: {default: true}`` only when no other ``match:``
  fitted). A repeated ``MessageSid`` starts nothing new. The answer is an empty
  TwiML ``<Response/>``.
- **status**: the message ledger moves the message's status forward only; on a real
  change a ``message`` event is written and ``twilio.status`` flows (optionally
  ``match: {status: [...]}``) start with ``trigger.message`` = the ledger's record
  (which flow, execution and node sent it). Late or repeated callbacks change nothing.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from flowchat.consent import consent_keyword
from flowchat.errors import FlowChatError
from flowchat.flow import Flow
from flowchat.keys import Keys
from flowchat.logs import mask_phones
from flowchat.messages import Ledger, SentBy
from flowchat.payloads import form_pairs
from flowchat.phones import normalize
from flowchat.settings import Settings
from flowchat.spec import MessageMatch
from flowchat.twilio_auth import SIGNATURE_HEADER, SignatureCheck, signed_url, signing_token
from flowchat.whatsapp import emit_message

log = logging.getLogger("flowchat.ingress")
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
MAX_BODY = 1024 * 1024
DEFAULT_TOKEN_ENV = "TWILIO_AUTH_TOKEN"
_WORD = re.compile(r"\w+")


class TwilioWebhooks:
    """The Twilio routes' state: settings, the signing token, and the services they record with.

    ``settings=None`` reads the environment on each request (embedding and tests that
    change it); the daemon hands its fixed settings and services.
    """

    def __init__(self, settings: Settings | None = None, services: Any = None) -> None:
        self._settings = settings
        self.services = services
        self._token: tuple[str, str] | None = None
        self._ledger: Ledger | None = None
        self._checks: dict[str, SignatureCheck] = {}

    def ledger(self, redis: Any, keys: Keys) -> Ledger:
        """The message ledger on the ingress's Redis (made once: its scripts and auto-pipeline are kept)."""
        if self._ledger is None or self._ledger.redis is not redis or self._ledger.keys != keys:
            self._ledger = Ledger(redis, keys)
        return self._ledger

    @property
    def settings(self) -> Settings:
        return self._settings if self._settings is not None else Settings.from_env()

    def token(self, settings: Settings) -> str:
        if settings.twilio_auth_token:
            return settings.twilio_auth_token
        if self._token is None or self._settings is None:
            self._token = signing_token(settings)
        return self._token[0]

    def check(self, token: str) -> SignatureCheck:
        """The signature check for ``token`` (made once per token: it keeps per-URL HMAC states)."""
        found = self._checks.get(token)
        if found is None:
            if len(self._checks) >= 16:  # tokens change only when settings are read per request
                self._checks.clear()
            found = self._checks[token] = SignatureCheck(token)
        return found

    def service(self, name: str) -> Any:
        services = self.services
        if services is None:
            return None
        return services.extra.get(name) if hasattr(services, "extra") else None


def twilio_mode(settings: Settings) -> str:
    """One line saying how WhatsApp works in this process (printed by ``flowchat serve``)."""
    if settings.twilio_account_sid and settings.twilio_auth_token:
        api = settings.twilio_api_url or "https://api.twilio.com"
        return f"whatsapp: sending through Twilio ({api}); /twilio/* signed with TWILIO_AUTH_TOKEN"
    _, where = signing_token(settings)
    return f"whatsapp: outbox mode (no TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN): sends are recorded, not sent; /twilio/* signed with {where}"


@dataclass(frozen=True, slots=True)
class TwilioForm:
    """A Twilio webhook's form, parsed once: the fields (a repeated name keeps its last value) and the pairs as sent."""

    params: dict[str, str]
    pairs: list[tuple[str, str]]
    """Every name and value in order: what the signature covers."""


def read_form(raw: bytes) -> TwilioForm:
    pairs = form_pairs(raw.decode("utf-8", "replace"))
    return TwilioForm(dict(pairs), pairs)


def signed_flows(
    request: web.Request, form: TwilioForm, flows: list[Flow], hooks: TwilioWebhooks, settings: Settings
) -> list[Flow]:
    """The flows this request may start; 403 (nothing stored) when no token we know signed it."""
    signature = request.headers.get(SIGNATURE_HEADER, "")
    url = signed_url(settings.public_url, request.path_qs, "" if settings.public_url else str(request.url))
    default_ok = hooks.check(hooks.token(settings)).valid(url, form.pairs, signature)
    verdicts: dict[str, bool] = {DEFAULT_TOKEN_ENV: default_ok}
    for env_name in {flow.trigger.auth_token_env for flow in flows} - {DEFAULT_TOKEN_ENV}:
        verdicts[env_name] = hooks.check(settings.env(env_name) or "").valid(url, form.pairs, signature)
    if not any(verdicts.values()):
        from flowchat.ingress import HttpProblem

        what = "missing" if not signature else "does not match"
        raise HttpProblem(403, f"{SIGNATURE_HEADER} {what} (signed for {url}?)")
    return [flow for flow in flows if verdicts.get(flow.trigger.auth_token_env)]


def addressed_to(flow: Flow, params: dict[str, str]) -> bool:
    to = getattr(flow.trigger, "to", None)
    return not to or params.get("To", "").removeprefix("whatsapp:") == to.removeprefix("whatsapp:")


# --- routing inbound messages ------------------------------------------------------------


def route(flows: list[Flow], params: dict[str, str]) -> list[Flow]:
    """The flows an inbound message starts: unconditional ones, fitting ``match:``es, else the defaults."""
    always = [flow for flow in flows if _match(flow) is None]
    fitting = [flow for flow in flows if (m := _match(flow)) is not None and not m.default and fits(m, params)]
    defaults = [flow for flow in flows if (m := _match(flow)) is not None and m.default]
    return always + (fitting or defaults)


def _match(flow: Flow) -> MessageMatch | None:
    return getattr(flow.trigger, "match", None)


def fits(match: MessageMatch, params: dict[str, str]) -> bool:
    """Every key given in ``match`` fits the message (AND)."""
    body = params.get("Body", "")
    if match.body_regex is not None and not match.body_regex.search(body):
        return False
    if match.keywords and not _has_keyword(body, match.keywords):
        return False
    if match.button is not None:
        wanted = [match.button] if isinstance(match.button, str) else match.button
        if params.get("ButtonPayload") not in wanted:
            return False
    if match.from_ is not None:
        wanted = [match.from_] if isinstance(match.from_, str) else match.from_
        sender = _digits(params.get("From", ""))
        if sender not in {_digits(phone) for phone in wanted}:
            return False
    return True


def _has_keyword(body: str, keywords: list[str]) -> bool:
    text = " " + " ".join(_WORD.findall(body.casefold())) + " "
    return any(f" {' '.join(_WORD.findall(keyword.casefold()))} " in text for keyword in keywords)


def _digits(phone: str) -> str:
    return "".join(char for char in phone.removeprefix("whatsapp:") if char.isdigit())


# --- recording -----------------------------------------------------------------------------


async def record_in_ledger(hooks: TwilioWebhooks, keys: Keys, redis: Any, params: dict[str, str]) -> None:
    """Record the inbound in the message ledger (idempotent per MessageSid); the first time, a ``message`` event."""
    sid = params.get("MessageSid", "")
    if not sid:
        return
    sender = _e164_or_raw(params.get("From", ""))
    fields = {
        "to": _e164_or_raw(params.get("To", "")), "from": sender,
        "body": params.get("Body", "")[:1600], "num_media": params.get("NumMedia", "0"),
        "button": params.get("ButtonPayload", ""), "profile_name": params.get("ProfileName", ""),
    }  # fmt: skip
    if await hooks.ledger(redis, keys).record_inbound(sid, fields):
        # the phone trigger.contact gets: the contact book keys by this same E.164 form
        emit_event(
            hooks, SentBy(), sid=sid, direction="inbound", phone=sender, status="received", error_code="",
            template=False,
        )  # fmt: skip


async def record_on_contact(hooks: TwilioWebhooks, params: dict[str, str]) -> dict[str, Any]:
    """Record the inbound on its contact (idempotent per MessageSid, STOP/START kept as consent); ``trigger.contact``."""
    raw_phone = params.get("From", "")
    consent = consent_keyword(params.get("Body", ""))
    contacts = hooks.service("contacts")
    phone = _e164_or_raw(raw_phone)
    if contacts is None or not phone.startswith("+"):
        return _unrecorded(phone, consent)
    try:
        contact: dict[str, Any] = await contacts.record_inbound(
            phone,
            profile_name=params.get("ProfileName") or None,
            message_sid=params.get("MessageSid", ""),
            at_ms=int(time.time() * 1000),
            consent=consent,
        )
    except FlowChatError as error:  # a sender the contact book cannot key (not a phone number)
        log.warning("inbound from %s not recorded on a contact: [%s] %s", mask_phones(phone), error.code, error)
        return _unrecorded(phone, consent)
    if consent:
        log.info("consent: %s %s by keyword", mask_phones(phone), consent.replace("_", " "))
    return contact


def _unrecorded(phone: str, keyword: str | None) -> dict[str, Any]:
    """``trigger.contact`` where no contact book is installed: the same shape, nothing known."""
    state = {"state": keyword or "unknown", "at": None, "source": "inbound" if keyword else None}
    return {"phone": phone, "created": False, "consent": state}


def _e164_or_raw(raw: str) -> str:
    try:
        return normalize(raw)
    except Exception:  # not a phone (e.g. a business-scoped WhatsApp id): keep what Twilio sent
        return raw.removeprefix("whatsapp:").strip()


def emit_event(hooks: TwilioWebhooks, by: SentBy, **data: Any) -> None:
    """A ``message`` event on the events stream (when the CRM's events service is installed)."""
    emit_message(hooks.service("events"), by, **data)


async def advance_status(
    hooks: TwilioWebhooks, keys: Keys, redis: Any, params: dict[str, str]
) -> dict[str, str] | None:
    """Apply a status callback to the ledger; the message after a real change, else None."""
    sid, status = params.get("MessageSid", ""), params.get("MessageStatus", "").lower()
    if not sid or not status:
        return None
    message = await hooks.ledger(redis, keys).advance(
        sid,
        status,
        error_code=params.get("ErrorCode", ""),
        error_message=params.get("ErrorMessage", ""),
        to=_e164_or_raw(params.get("To", "")),
        from_=_e164_or_raw(params.get("From", "")),
    )
    if message is None:
        return None
    if params.get("ErrorCode") == "21610":
        contacts = hooks.service("contacts")
        if contacts is not None:
            await contacts.set_consent(message.get("to", ""), "opted_out", "twilio-21610")
    emit_event(
        hooks,
        SentBy(message.get("flow", ""), message.get("execution", ""), message.get("node", "")),
        sid=sid,
        direction="outbound",
        phone=message.get("to", ""),
        status=status,
        error_code=params.get("ErrorCode", ""),
        template=message.get("template") == "1",
    )
    return message
