"""Which token signs Twilio webhooks, and checking ``X-Twilio-Signature`` with twilio's RequestValidator.

With ``TWILIO_AUTH_TOKEN`` set, Twilio signs with it. Without it (outbox mode)
the daemon makes a local signing token once, in ``<data dir>/twilio-signing-token``
(mode 0600), checks ``/twilio/*`` against it, and ``flowchat simulate`` signs
with the same file: inbound webhooks stay authenticated and nothing needs an account.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

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
    """True when ``signature`` is Twilio's HMAC-SHA1 of ``url`` + sorted ``params`` under ``token``."""
    from twilio.request_validator import RequestValidator

    return bool(signature) and bool(token) and RequestValidator(token).validate(url, params, signature)


def sign(token: str, url: str, params: Mapping[str, str]) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for this request (``flowchat simulate``, tests)."""
    from twilio.request_validator import RequestValidator

    return str(RequestValidator(token).compute_signature(url, dict(params)))
