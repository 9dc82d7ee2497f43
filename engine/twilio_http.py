"""The HTTP client FlowChat hands the twilio library.

The stock ``AsyncTwilioHttpClient`` does not fit a durable sender:

- it passes ``timeout=None`` to aiohttp, which means no timeout at all
  (twilio/twilio-python#925); here every request has a total deadline;
- ``max_retries`` wraps it in aiohttp-retry, which re-POSTs on 5xx and so can send
  one message twice; here nothing is retried — the queue owns retries;
- errors reach the caller as ``TwilioRestException`` without the response headers,
  so ``Retry-After`` is lost; here the last response of the calling task is kept
  (:func:`last_response`), so the sender can honour it;
- it cannot reach anything but ``*.twilio.com``; here ``base_url`` (the setting
  ``FLOWCHAT_TWILIO_API_URL``) replaces Twilio's scheme and host, for gateways and tests;
- aiohttp cannot encode a repeated form field given as a list (``MediaUrl``);
  here lists become repeated fields, as Twilio expects.

Create it inside the running event loop (it opens an aiohttp session) and
``await close()`` it on shutdown.
"""

from __future__ import annotations

import base64
import contextvars
import logging
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from twilio.http import AsyncHttpClient
from twilio.http.response import Response

log = logging.getLogger("flowchat.twilio")

_last: contextvars.ContextVar[list[Response] | None] = contextvars.ContextVar("flowchat_twilio_last", default=None)


def capture_responses() -> list[Response]:
    """Start collecting the responses of requests made by the current task (see :func:`last_response`)."""
    box: list[Response] = []
    _last.set(box)
    return box


class TwilioHttp(AsyncHttpClient):  # type: ignore[misc]  # twilio ships no type information
    """An async twilio HTTP client with a deadline, no retries, a base URL and visible headers."""

    def __init__(self, base_url: str = "", timeout: float = 15.0) -> None:
        super().__init__(log, is_async=True, timeout=timeout)
        self.base_url = base_url.rstrip("/")
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def request(
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        async with self.session.request(
            method.upper(),
            self.rewrite(uri),
            params=_fields(params),
            data=_fields(data),
            headers=_with_auth(headers, auth),
            allow_redirects=allow_redirects,
            timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
        ) as reply:
            response = Response(reply.status, await reply.text(), dict(reply.headers))
        box = _last.get()
        if box is not None:
            box.append(response)
        return response

    def rewrite(self, uri: str) -> str:
        """Twilio's URL with the scheme and host of ``base_url`` (when set), path and query kept."""
        if not self.base_url:
            return uri
        base, parts = urlsplit(self.base_url), urlsplit(uri)
        path = base.path.rstrip("/") + parts.path
        return urlunsplit((base.scheme, base.netloc, path, parts.query, ""))

    async def close(self) -> None:
        await self.session.close()


def _with_auth(headers: dict[str, str] | None, auth: tuple[str, str] | None) -> dict[str, str]:
    """HTTP Basic auth as a header (aiohttp's ``auth=`` is deprecated)."""
    merged = dict(headers or {})
    if auth:
        merged["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    return merged


def _fields(values: dict[str, object] | None) -> list[tuple[str, str]] | None:
    """Form/query fields with lists spread into repeated fields."""
    if not values:
        return None
    flat: list[tuple[str, str]] = []
    for name, value in values.items():
        items = list(value) if isinstance(value, list | tuple) else [value]
        flat += [(name, str(item)) for item in items]
    return flat
