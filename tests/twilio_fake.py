"""A local Twilio-compatible server for tests: Messages create, Twilio's errors, signed status callbacks.

It speaks the wire format the real ``twilio`` library expects (2010 API, form
bodies, HTTP Basic auth, JSON answers, the legacy error JSON with ``code``,
``message``, ``more_info``, ``status``, and ``Retry-After`` on 429/503) and
counts every POST, so tests can assert how many times a message was sent.

    fake = await TwilioFake.start()
    fake.script("429", "ok")            # next answers, in order; then "ok"
    ... FLOWCHAT_TWILIO_API_URL=fake.url ...
    await fake.callback(sid, "delivered")   # signed POST to the message's StatusCallback
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

ACCOUNT_SID = "AC" + "0" * 32
AUTH_TOKEN = "fake-auth-token-0123456789abcdef"
REFERENCE_INBOUND = dict(
    SmsMessageSid="SM5f1c0e8b2a3d4c6e9f7a1b2c3d4e5f60", NumMedia="0", ProfileName="Ana Souza", MessageType="text",
    SmsSid="SM5f1c0e8b2a3d4c6e9f7a1b2c3d4e5f60", WaId="5511987654321", SmsStatus="received",
    Body="Oi, quero saber o preço", To="whatsapp:+14155550100", NumSegments="1", ReferralNumMedia="0",
    MessageSid="SM5f1c0e8b2a3d4c6e9f7a1b2c3d4e5f60", AccountSid="AC0123456789abcdef0123456789abcdef",
    From="whatsapp:+5511987654321", ApiVersion="2010-04-01",
)  # fmt: skip
"""The worked WhatsApp inbound of the Twilio reference (../shared/reference): 15 params, its URL and token give its signature."""

ERRORS: dict[str, tuple[int, int, str]] = {
    "429": (429, 20429, "Too Many Requests"),
    "500": (500, 20500, "Internal Server Error"),
    "503": (503, 20503, "Service Unavailable"),
    "21211": (400, 21211, "The 'To' number is not a valid phone number."),
    "21408": (400, 21408, "Permission to send an SMS has not been enabled for the region"),
    "21610": (400, 21610, "Attempt to send to unsubscribed recipient"),
    "21614": (400, 21614, "'To' number is not a valid mobile number"),
    "63016": (400, 63016, "Failed to send freeform message because you are outside the allowed window."),
    "63018": (429, 63018, "Rate limit exceeded for the channel"),
}


@dataclass
class Sent:
    """One Messages create request the fake received."""

    sid: str
    form: dict[str, list[str]]
    answered: int

    def one(self, name: str) -> str | None:
        values = self.form.get(name)
        return values[0] if values else None


@dataclass
class TwilioFake:
    """The fake server; ``posts`` counts every POST to Messages.json, whatever was answered."""

    account_sid: str = ACCOUNT_SID
    auth_token: str = AUTH_TOKEN
    retry_after: str = "1"
    posts: int = 0
    sent: list[Sent] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _sids: Any = field(default_factory=lambda: itertools.count(1))
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, **options: Any) -> TwilioFake:
        fake = cls(**options)
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{account}/Messages.json", fake._create)
        fake._runner = web.AppRunner(app)
        await fake._runner.setup()
        site = web.TCPSite(fake._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        fake.url = f"http://127.0.0.1:{port}"
        return fake

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def script(self, *answers: str) -> None:
        """The next answers in order: ``ok``, ``hang`` (never answers) or an error name from ERRORS."""
        self.answers.extend(answers)

    @property
    def ok_sends(self) -> list[Sent]:
        return [sent for sent in self.sent if sent.answered == 201]

    async def _create(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        if not self._authorized(request.headers.get("Authorization", "")):
            return _error(401, 20003, "Authenticate")
        form: dict[str, list[str]] = {}
        for name, value in (await request.post()).items():
            form.setdefault(name, []).append(str(value))
        answer = self.answers.pop(0) if self.answers else "ok"
        sid = f"SM{next(self._sids):032x}"
        if answer == "hang":
            self.sent.append(Sent(sid, form, 0))
            await self._release.wait()
            return web.Response(status=504)
        if answer in ERRORS:
            status, code, message = ERRORS[answer]
            self.sent.append(Sent(sid, form, status))
            headers = {"Retry-After": self.retry_after} if status in (429, 503) else {}
            return _error(status, code, message, headers)
        self.sent.append(Sent(sid, form, 201))
        return web.json_response(self._message(sid, form), status=201)

    def _authorized(self, header: str) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return header == f"Basic {expected}"

    def _message(self, sid: str, form: dict[str, list[str]]) -> dict[str, Any]:
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json"
        return {
            "account_sid": self.account_sid, "api_version": "2010-04-01", "body": (form.get("Body") or [""])[0],
            "date_created": "Thu, 27 Nov 2026 10:31:02 +0000", "date_sent": None,
            "date_updated": "Thu, 27 Nov 2026 10:31:02 +0000", "direction": "outbound-api", "error_code": None,
            "error_message": None, "from": (form.get("From") or [""])[0], "messaging_service_sid": None,
            "num_media": str(len(form.get("MediaUrl", []))), "num_segments": "1", "price": None, "price_unit": None,
            "sid": sid, "status": "queued", "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
            "to": (form.get("To") or [""])[0], "uri": uri,
        }  # fmt: skip

    async def callback(
        self,
        sid: str,
        status: str,
        *,
        error_code: str = "",
        url: str | None = None,
        sign_for: str | None = None,
        token: str | None = None,
    ) -> int:
        """POST a signed status callback for ``sid`` to its StatusCallback (or ``url``); returns the HTTP status."""
        sent = next((s for s in self.sent if s.sid == sid), None)
        target = url or (sent.one("StatusCallback") if sent else None)
        assert target, f"no StatusCallback for {sid}"
        params = {
            "MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
            "AccountSid": self.account_sid, "ApiVersion": "2010-04-01", "ChannelPrefix": "whatsapp",
            "To": (sent.one("To") if sent else None) or "whatsapp:+15550001111",
            "From": (sent.one("From") if sent else None) or "whatsapp:+15550009999",
        }  # fmt: skip
        if error_code:
            params.update(ErrorCode=error_code, ErrorMessage=f"error {error_code}")
        signature = RequestValidator(token or self.auth_token).compute_signature(sign_for or target, params)
        async with (
            aiohttp.ClientSession() as session,
            session.post(target, data=params, headers={"X-Twilio-Signature": signature}) as response,
        ):
            return response.status


def _error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status, headers=headers)


def new_sid() -> str:
    return "SM" + uuid.uuid4().hex
