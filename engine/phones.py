"""Phone numbers: one normal form (E.164) for keys, and one mask for anything a person reads.

Contacts are keyed by E.164 (``+14155550123``). :func:`normalize` accepts what people and
providers send (``whatsapp:+1 415-555-0123``, ``(415) 555 0123`` with a default region) and
insists only on a *possible* number, not a valid one, so test and fictional ranges
(+1 555 …) work. :func:`mask` is what logs and tables show: ``+1415***0123``.

What providers send is nearly always ``+`` and digits (Twilio: ``whatsapp:+14155550123``). Those
are answered from phonenumbers' metadata by the steps ``phonenumbers.parse``,
``is_possible_number_with_reason`` and ``format_number(E164)`` take for such a string, at a
fraction of their cost; any other shape, and any case those steps treat specially, goes through
the library itself (``tests/engine/test_phones.py`` checks the two agree).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, NumberParseException, PhoneMetadata, ValidationResult

from flowchat.errors import NodeError

WHATSAPP_PREFIX = "whatsapp:"

_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: "no country code (start with + or set FLOWCHAT_DEFAULT_REGION)",
    NumberParseException.NOT_A_NUMBER: "not a phone number",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    NumberParseException.TOO_LONG: "too long",
}


def normalize(raw: str, default_region: str = "") -> str:
    """``raw`` as E.164; raises ``NodeError(code="invalid-phone")`` naming the masked input."""
    return _e164(_without_prefixes(raw), (default_region or "").upper())


def _without_prefixes(raw: str) -> str:
    text = str(raw).strip()
    if text.lower().startswith(WHATSAPP_PREFIX):
        text = text[len(WHATSAPP_PREFIX) :].strip()
    if text.startswith("00"):  # the international prefix most of the world dials
        text = "+" + text[2:]
    return text


# One execution of the CRM flow normalises its sender's number in ingress, contact.*, the limiter key
# and whatsapp.send. Only successes are cached (errors are raised).
@functools.lru_cache(maxsize=8192)
def _e164(text: str, region: str) -> str:
    fast = _e164_fast(text, region)
    return fast if fast is not None else _e164_library(text, region)


def _e164_library(text: str, region: str) -> str:
    """The reference: parse, check and format with phonenumbers (~10 µs a number)."""
    try:
        number = phonenumbers.parse(text, region or None)
    except NumberParseException as exc:
        raise _invalid(text, _REASONS.get(exc.error_type, "cannot be parsed")) from exc
    # local-only numbers (7 digits in the US) are possible to dial locally but cannot key a contact
    if phonenumbers.is_possible_number_with_reason(number) != ValidationResult.IS_POSSIBLE:
        raise _invalid(text, "not a possible number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# "+", a country code (which never starts with 0), at least two more digits, nothing else.
_PLUS_DIGITS = re.compile(r"\+[1-9][0-9]{2,}")
_MAX_INPUT = 250  # parse() refuses longer text before anything else
_MIN_NSN, _MAX_NSN = 2, 17
# parse() reads the default region's metadata for a number of its own calling code, and that of the
# non-geographical entities (+800, +882, …) is not a region's: answered by the library.
_NON_GEO_REGION = "001"


@dataclass(frozen=True, slots=True)
class _Plan:
    """What parse and the possibility check read from one calling code's metadata."""

    code: str
    national_prefix: re.Pattern[str] | None  # national_prefix_for_parsing
    transform: str  # national_prefix_transform_rule, "" for none
    general: re.Pattern[str] | None  # general_desc.national_number_pattern
    lengths: tuple[int, ...]
    local_lengths: tuple[int, ...]


def _e164_fast(text: str, region: str) -> str | None:
    """What :func:`_e164_library` returns or raises for ``+digits``; None for anything else."""
    if region == _NON_GEO_REGION or len(text) > _MAX_INPUT or not _PLUS_DIGITS.fullmatch(text):
        return None
    code = _calling_code(text[1:4])
    plan = _plan(code) if code is not None else None
    if plan is None:
        return None
    rest = text[1 + len(plan.code) :]
    if len(rest) < _MIN_NSN:
        raise _invalid(text, _REASONS[NumberParseException.TOO_SHORT_NSN])
    national = _national_number(rest, plan)
    if len(national) < _MIN_NSN:
        raise _invalid(text, _REASONS[NumberParseException.TOO_SHORT_NSN])
    if len(national) > _MAX_NSN:
        raise _invalid(text, _REASONS[NumberParseException.TOO_LONG])
    if _length_verdict(national, plan) != ValidationResult.IS_POSSIBLE:
        raise _invalid(text, "not a possible number")
    # format_number rebuilds the national number with its leading zeros: the digits as they stand
    return f"+{plan.code}{national}"


def _calling_code(head: str) -> int | None:
    """The calling code ``head`` starts with (codes are prefix-free), as parse extracts it."""
    for size in (1, 2, 3):
        if int(head[:size]) in COUNTRY_CODE_TO_REGION_CODE:
            return int(head[:size])
    return None


@functools.cache
def _plan(code: int) -> _Plan | None:
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, COUNTRY_CODE_TO_REGION_CODE[code][0])
    general = metadata.general_desc if metadata is not None else None
    if metadata is None or general is None or not general.possible_length:
        return None
    prefix = re.compile(metadata.national_prefix_for_parsing) if metadata.national_prefix_for_parsing else None
    transform = metadata.national_prefix_transform_rule or ""
    if transform and (prefix is None or prefix.groups == 0):  # the library fails on these with IndexError
        return None
    pattern = general.national_number_pattern
    return _Plan(
        code=str(code),
        national_prefix=prefix,
        transform=transform,
        general=re.compile(pattern) if pattern else None,
        lengths=tuple(general.possible_length),
        local_lengths=tuple(general.possible_length_local_only or ()),
    )


def _national_number(rest: str, plan: _Plan) -> str:
    """``rest`` without a national prefix, kept only when its length could be a number's (as parse does)."""
    stripped = _strip_national_prefix(rest, plan)
    unfit = (ValidationResult.TOO_SHORT, ValidationResult.IS_POSSIBLE_LOCAL_ONLY, ValidationResult.INVALID_LENGTH)
    return rest if _length_verdict(stripped, plan) in unfit else stripped


def _strip_national_prefix(number: str, plan: _Plan) -> str:
    """phonenumbers' ``_maybe_strip_national_prefix_carrier_code``, without the carrier code."""
    match = plan.national_prefix.match(number) if plan.national_prefix is not None else None
    if match is None:
        return number
    if plan.transform and match.groups()[-1] is not None:
        stripped = match.re.sub(plan.transform, number, count=1)
    else:
        stripped = number[match.end() :]
    if _fits_general(number, plan) and not _fits_general(stripped, plan):
        return number
    return stripped


def _fits_general(number: str, plan: _Plan) -> bool:
    return plan.general is not None and plan.general.fullmatch(number) is not None


def _length_verdict(number: str, plan: _Plan) -> int:
    """phonenumbers' ``_test_number_length`` against the general description."""
    size, lengths = len(number), plan.lengths
    if size in plan.local_lengths:
        return ValidationResult.IS_POSSIBLE_LOCAL_ONLY
    if size == lengths[0]:
        return ValidationResult.IS_POSSIBLE
    if size < lengths[0]:
        return ValidationResult.TOO_SHORT
    if size > lengths[-1]:
        return ValidationResult.TOO_LONG
    return ValidationResult.IS_POSSIBLE if size in lengths[1:] else ValidationResult.INVALID_LENGTH


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
