"""``flowchat simulate`` and ``flowchat messages``: the WhatsApp loop without Twilio, and the message ledger.

- ``flowchat simulate message --from +15551234567 --body "hi" [--url http://127.0.0.1:8080]``
  posts an inbound webhook signed exactly as Twilio would (``TWILIO_AUTH_TOKEN``, or the
  outbox-mode token in the data dir), for ``FLOWCHAT_PUBLIC_URL`` when set.
- ``flowchat simulate status SID delivered [--url …]`` posts a signed status callback.
- ``flowchat messages list [--to PHONE] [--status S]`` and ``flowchat messages show SID`` read the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from flowchat.listing import limit as listing_limit
from flowchat.settings import Settings, SettingsError

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TO = "+14155550100"


def add_commands(sub: Any) -> None:
    """Add ``simulate`` and ``messages`` to the ``flowchat`` parser and register their handlers."""
    p = sub.add_parser("simulate", help="post a signed Twilio webhook (inbound message or status) to a daemon")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("message", help="an inbound WhatsApp message", description="Post an inbound message.")
    a.add_argument("--from", dest="from_", required=True, metavar="PHONE", help="sender, E.164")
    a.add_argument("--body", default="", help="the text")
    a.add_argument("--to", default="", metavar="PHONE", help="your number (default $TWILIO_WHATSAPP_NUMBER)")
    a.add_argument("--name", default="", help="the sender's WhatsApp ProfileName")
    a.add_argument("--button", default="", metavar="PAYLOAD", help="a quick-reply ButtonPayload")
    a.add_argument("--media", action="append", default=[], metavar="URL", help="a media URL (repeatable)")
    a.add_argument("--sid", default="", help="MessageSid (default: a new one)")
    a.add_argument("--url", default=DEFAULT_URL, help=f"the daemon (default {DEFAULT_URL})")
    a = actions.add_parser("status", help="a delivery status callback", description="Post a status callback.")
    a.add_argument("sid", help="MessageSid of a sent message")
    a.add_argument("status", help="queued, sent, delivered, read, failed, undelivered")
    a.add_argument("--error-code", default="", help="Twilio ErrorCode (with failed/undelivered)")
    a.add_argument("--url", default=DEFAULT_URL, help=f"the daemon (default {DEFAULT_URL})")
    p.set_defaults(handler=simulate)

    p = sub.add_parser("messages", help="the WhatsApp message ledger: what was sent and its delivery status")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("list", help="recent messages, newest first", description="Recent messages.")
    a.add_argument("--to", default="", metavar="PHONE", help="only to this phone (E.164)")
    a.add_argument("--status", default="", help="only in this status (simulated, queued, sent, delivered, …)")
    a.add_argument("--limit", type=listing_limit, default=20, help="at most this many (default 20)")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("show", help="one message by sid", description="One message by sid.")
    a.add_argument("sid")
    a.add_argument("--json", action="store_true")
    p.set_defaults(handler=messages)


# --- simulate --------------------------------------------------------------------------


def simulate(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "message":
        path, params = "/twilio/message", _inbound(args, settings)
    else:
        path, params = "/twilio/status", _status(args)
    return asyncio.run(_post(settings, args.url.rstrip("/"), path, params))


def _inbound(args: argparse.Namespace, settings: Settings) -> dict[str, str]:
    sender = _address(args.from_)
    to = _address(args.to or settings.twilio_whatsapp_number or DEFAULT_TO)
    sid = args.sid or ("MM" if args.media else "SM") + uuid.uuid4().hex
    params = {
        "MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid, "AccountSid": settings.twilio_account_sid or "AC" + "0" * 32,
        "From": sender, "To": to, "Body": args.body, "ProfileName": args.name, "WaId": sender.removeprefix("whatsapp:+"),
        "NumMedia": str(len(args.media)), "NumSegments": "1", "SmsStatus": "received", "ApiVersion": "2010-04-01",
        "MessageType": "button" if args.button else ("image" if args.media else "text"),
    }  # fmt: skip
    for index, url in enumerate(args.media):
        params[f"MediaUrl{index}"] = url
    if args.button:
        params.update(ButtonPayload=args.button, ButtonText=args.body or args.button)
    return params


def _status(args: argparse.Namespace) -> dict[str, str]:
    params = {
        "MessageSid": args.sid, "SmsSid": args.sid, "MessageStatus": args.status, "SmsStatus": args.status,
        "ChannelPrefix": "whatsapp", "ApiVersion": "2010-04-01",
    }  # fmt: skip
    if args.error_code:
        params.update(ErrorCode=args.error_code, ErrorMessage=f"simulated error {args.error_code}")
    return params


def _address(phone: str) -> str:
    phone = phone.strip()
    return phone if phone.startswith("whatsapp:") else f"whatsapp:{phone}"


async def _post(settings: Settings, base: str, path: str, params: dict[str, str]) -> int:
    import aiohttp

    from flowchat.twilio_auth import sign, signed_url, signing_token

    token, where = signing_token(settings)
    url = signed_url(settings.public_url, path, f"{base}{path}")
    headers = {"X-Twilio-Signature": sign(token, url, params)}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.post(f"{base}{path}", data=params, headers=headers) as response,
        ):
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        print(f"error: cannot reach the daemon at {base}: {exc} (is `flowchat serve` running?)", file=sys.stderr)
        return 1
    if response.status != 200:
        print(f"error: {response.status} from {base}{path}: {text.strip()[:300]}", file=sys.stderr)
        if response.status == 403:
            print(f"hint: signed with {where} for {url}; the daemon must use the same token and URL", file=sys.stderr)
        return 1
    what = f"message {params['MessageSid']}" if path.endswith("message") else f"status {params['MessageStatus']}"
    print(f"ok  {what} accepted by {base}{path} (signed with {where})")
    return 0


# --- messages --------------------------------------------------------------------------


def messages(args: argparse.Namespace) -> int:
    from flowchat.cli import _with_queue
    from flowchat.messages import Ledger

    if args.action == "list":
        to = _phone(args.to)
        rows = _with_queue(lambda q: Ledger(q.redis, q.keys).recent(to=to, status=args.status, limit=args.limit))
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'sid':<34}  {'to':<16} {'status':<11} {'flow':<18} {'age':>6}  error")
        for row in rows:
            print(
                f"{row.get('sid', ''):<34}  {_masked(row.get('to', '')):<16} {row.get('status', ''):<11} "
                f"{row.get('flow', ''):<18} {_age(row.get('created_at')):>6}  {row.get('error_code', '')}"
            )
        return 0
    message = _with_queue(lambda q: Ledger(q.redis, q.keys).get(args.sid))
    if message is None:
        print(f"error: no message {args.sid} in the ledger", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(message, indent=2))
    else:
        print("\n".join(show_lines(message)))
    return 0


_PHONE_FIELDS = ("to", "from")


def show_lines(message: dict[str, str]) -> list[str]:
    """``messages show`` as text: phones masked as in logs, epoch-ms times as UTC (``--json`` keeps both raw)."""
    lines = []
    for name, value in sorted(message.items()):
        if name in _PHONE_FIELDS:
            value = _masked(value)
        elif name.endswith("_at") or name.startswith("at:"):
            value = _when(value)
        lines.append(f"{name:<14} {value}")
    return lines


def _masked(phone: str) -> str:
    from flowchat.phones import mask

    return mask(phone) if phone else ""


def _when(epoch_ms: str) -> str:
    try:
        moment = datetime.fromtimestamp(int(epoch_ms) / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):
        return epoch_ms
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC"


def _phone(raw: str) -> str:
    if not raw:
        return ""
    try:
        from flowchat.whatsapp import e164

        return e164(raw, "--to")
    except Exception:  # an unparseable filter simply matches nothing
        return raw


def _age(created_ms: str | None) -> str:
    if not created_ms:
        return "?"
    seconds = max(0.0, time.time() - int(created_ms) / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
