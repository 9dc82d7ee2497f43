"""Which token signs Twilio webhooks, and checking ``X-Twilio-Signature`` exactly as twilio's RequestValidator does.

With ``TWILIO_AUTH_TOKEN`` set, Twilio signs with it. Without it (outbox mode)
the daemon makes a local signing token once, in ``<data dir>/twilio-signing-token``
(mode 0600), checks ``/twilio/*`` against it, and ``flowchat simulate`` signs
with the same file: inbound webhooks stay authenticated and nothing needs an account.

:class:`SignatureCheck` is ``RequestValidator(token).validate(url, params, signature)``
(twilio 9.x, HMAC-SHA1 of the URL and the sorted parameters, the URL tried without
and with its default port) with the work that depends only on the token and the URL
done once per URL, and the parameters joined once for both URL forms.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from twilio.request_validator import add_port, remove_port

from flowchat.settings import Settings

TOKEN_FILE = "twilio-signing-token"
SIGNATURE_HEADER = "X-Twilio-Signature"


def token_path(settings: Settings) -> Path:
    return settings.data_dir / TOKEN_FILE


def signing_token(settings: Settings, *, create: bool = True) -> tuple[str, str]:
    """``(token, where it comes from)``: the account's auth token, else the local token (made if missing)."""
    if settings.twilio_auth_token:
        return settings.twilio_auth_token, "TWILIO_AUTH_TOKEN"
    path = token_path(settings)
    try:
        return path.read_text().strip(), str(path)
    except FileNotFoundError:
        if not create:
            raise
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text().strip(), str(path)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return token, str(path)


def signed_url(public_url: str, path_qs: str, seen_url: str) -> str:
    """The URL Twilio signed: the public base URL + path and query when configured, else what we saw."""
    return f"{public_url.rstrip('/')}{path_qs}" if public_url else seen_url


def is_signed(token: str, url: str, params: Mapping[str, str], signature: str) -> bool:
    """True when ``signature`` is Twilio's HMAC-SHA1 of ``url`` + sorted ``params`` under ``token``.

    twilio's own RequestValidator, per call (the reference :class:`SignatureCheck` is tested against).
    """
    from twilio.request_validator import RequestValidator

    return bool(signature) and bool(token) and RequestValidator(token).validate(url, params, signature)


def signed_text(pairs: Sequence[tuple[str, str]]) -> str:
    """What Twilio appends to the URL before signing: each name, sorted, then its distinct values, sorted.

    ``pairs`` as the form sent them: a repeated name keeps every value, as RequestValidator
    does with a MultiDict.
    """
    params = dict(pairs)
    if len(params) == len(pairs):  # no repeated name (Twilio's own webhooks): one value each
        return "".join([name + params[name] for name in sorted(params)])
    values: dict[str, set[str]] = {}
    for name, value in pairs:
        values.setdefault(name, set()).add(value)
    return "".join([name + value for name in sorted(values) for value in sorted(values[name])])


class SignatureCheck:
    """``X-Twilio-Signature`` checks under one token, exactly RequestValidator.validate's answer.

    The URL's two forms (without and with its default port, as twilio tries both) and the
    HMAC state after the token and each form are kept per URL (a bounded cache), so a request
    costs one join of its parameters and one or two HMAC finishes.
    """

    MAX_URLS = 256
    """URLs whose HMAC states are kept (the routes times their query strings; cleared when full)."""

    def __init__(self, token: str) -> None:
        self._key = token.encode("utf-8")
        self._urls: dict[str, tuple[Any, ...]] = {}

    def valid(self, url: str, pairs: Sequence[tuple[str, str]], signature: str) -> bool:
        """True when ``signature`` signs ``url`` and the form ``pairs`` (False for an empty signature)."""
        if not signature or not self._key:
            return False
        payload = signed_text(pairs).encode("utf-8")
        given = signature.encode("utf-8", "surrogatepass")
        for state in self._states(url):
            mac = state.copy()
            mac.update(payload)
            if hmac.compare_digest(base64.b64encode(mac.digest()), given):
                return True
        return False

    def _states(self, url: str) -> tuple[Any, ...]:
        states = self._urls.get(url)
        if states is None:
            parsed = urlparse(url)
            forms = (remove_port(parsed), add_port(parsed))  # the order and functions of twilio's validate
            states = tuple(hmac.new(self._key, form.encode("utf-8"), hashlib.sha1) for form in forms)
            if len(self._urls) >= self.MAX_URLS:
                self._urls.clear()
            self._urls[url] = states
        return states


def sign(token: str, url: str, params: Mapping[str, str]) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for this request (``flowchat simulate``, tests)."""
    from twilio.request_validator import RequestValidator

    return str(RequestValidator(token).compute_signature(url, dict(params)))
