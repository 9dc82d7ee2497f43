"""Phone numbers: one normal form (E.164) for keys, and one mask for anything a person reads.

Contacts are keyed by E.164 (``+14155550123``). :func:`normalize` accepts what people and
providers send (``whatsapp:+1 415-555-0123``, ``(415) 555 0123`` with a default region) and
insists only on a *possible* number, not a valid one, so test and fictional ranges
(+1 555 …) work. :func:`mask` is what logs and tables show: ``+1415***0123``.
"""

from __future__ import annotations

import functools

import phonenumbers

from flowchat.errors import NodeError

WHATSAPP_PREFIX = "whatsapp:"


def normalize(raw: str, default_region: str = "") -> str:
    """``raw`` as E.164; raises ``NodeError(code="invalid-phone")`` naming the masked input."""
    text = str(raw).strip()
    if text.lower().startswith(WHATSAPP_PREFIX):
        text = text[len(WHATSAPP_PREFIX) :].strip()
    if text.startswith("00"):  # the international prefix most of the world dials
        text = "+" + text[2:]
    return _e164(text, (default_region or "").upper())


# One execution of the CRM flow normalises its sender's number in ingress, contact.*, the limiter key
# and whatsapp.send; parsing costs ~50 µs each time. Only successes are cached (errors are raised).
@functools.lru_cache(maxsize=8192)
def _e164(text: str, region: str) -> str:
    try:
        number = phonenumbers.parse(text, region or None)
    except phonenumbers.NumberParseException as exc:
        raise _invalid(text, _reason(exc)) from exc
    # local-only numbers (7 digits in the US) are possible to dial locally but cannot key a contact
    if phonenumbers.is_possible_number_with_reason(number) != phonenumbers.ValidationResult.IS_POSSIBLE:
        raise _invalid(text, "not a possible number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def mask(phone: str) -> str:
    """``+14155550123`` → ``+1415***0123``: enough to tell numbers apart, not to dial."""
    digits = "".join(ch for ch in str(phone) if ch.isdigit())
    if len(digits) < 8:
        return "***"
    head = f"+{digits[:4]}" if str(phone).strip().startswith("+") else digits[:3]
    return f"{head}***{digits[-4:]}"


def _invalid(text: str, reason: str) -> NodeError:
    shown = mask(text) if sum(ch.isdigit() for ch in text) >= 8 else repr(text[:3] + "…" if len(text) > 3 else text)
    return NodeError(f"invalid phone number {shown}: {reason}", code="invalid-phone", retryable=False)


def _reason(exc: phonenumbers.NumberParseException) -> str:
    reasons = {
        phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "no country code (start with + or set FLOWCHAT_DEFAULT_REGION)",
        phonenumbers.NumberParseException.NOT_A_NUMBER: "not a phone number",
        phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
        phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
        phonenumbers.NumberParseException.TOO_LONG: "too long",
    }
    return reasons.get(exc.error_type, "cannot be parsed")
