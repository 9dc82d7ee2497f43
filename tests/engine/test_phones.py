"""flowchat.phones: one normal form (E.164) for keys, one mask for people."""

from __future__ import annotations

import functools
from collections.abc import Callable

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata

from flowchat import NodeError
from flowchat.phones import _e164_fast, _e164_library, _without_prefixes, mask, normalize

CODES = sorted(COUNTRY_CODE_TO_REGION_CODE)
DIGITS = "0123456789"
# "001" is the non-geographical entities' region (answered by the library), "ZZ" none at all
REGIONS = ["", "US", "GB", "BR", "AR", "JP", "001", "ZZ"]


def test_phones_normalise_to_e164_and_mask() -> None:
    assert normalize("whatsapp:+1 (415) 555-0123") == "+14155550123"
    assert normalize("415.555.0123", "US") == "+14155550123"
    assert normalize("+1 555 010 0123") == "+15550100123"  # a fictional range: possible is enough
    assert mask("+14155550123") == "+1415***0123"
    for bad in ("hello", "+1 555", "4155550123", "+1 415 555 0123 9999"):
        with pytest.raises(NodeError) as caught:
            normalize(bad)
        assert caught.value.code == "invalid-phone" and not caught.value.retryable
        assert "0123" not in caught.value.message or "***" in caught.value.message


def test_plus_digits_keep_the_library_s_national_prefix_rules() -> None:
    assert normalize("whatsapp:+14155550123") == "+14155550123"
    assert normalize("+4407911123456") == "+447911123456"  # the UK trunk 0 goes
    assert normalize("+54111512345678") == "+5491112345678"  # Argentina: 15 becomes the mobile 9
    assert normalize("+378912345") == "+3780549912345"  # San Marino: the 0549 area code is added
    assert normalize("+3901234567") == "+3901234567"  # Italy keeps its leading zero


def outcome(e164: Callable[[str, str], str | None], text: str, region: str) -> tuple[str, str | None]:
    """("ok", the E.164 string or None) or (the error's code, its message)."""
    try:
        return "ok", e164(text, region)
    except NodeError as error:
        return error.code, error.message


def check_fast_path(text: str, region: str) -> None:
    fast = outcome(_e164_fast, text, region)
    # the fast path answers every "+" and three digits or more that starts with a known calling code
    assert (fast == ("ok", None)) == (region == "001" or len(text) < 4), text
    if fast != ("ok", None):
        assert fast == outcome(_e164_library, text, region), text


@functools.cache
def examples(code: int) -> list[str]:
    """The national significant numbers of phonenumbers' example numbers for ``code``, every type."""
    found = []
    for region in COUNTRY_CODE_TO_REGION_CODE[code]:
        if region == "001":
            numbers = [phonenumbers.example_number_for_non_geo_entity(code)]
        else:
            kinds = phonenumbers.supported_types_for_region(region)
            numbers = [phonenumbers.example_number_for_type(region, kind) for kind in kinds]
        found += [phonenumbers.national_significant_number(number) for number in numbers if number is not None]
    return sorted(set(found)) or ["1234567"]


@functools.cache
def national_prefixes(code: int) -> list[str]:
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, COUNTRY_CODE_TO_REGION_CODE[code][0])
    assert metadata is not None
    return sorted({"", "0", "1", "8", "9", "00", "15", "90", metadata.national_prefix or ""})


def test_fast_path_agrees_for_every_calling_code_length_and_example() -> None:
    for code in CODES:
        nationals = [fill * size for size in range(18) for fill in ("0", "1", "5", "9")]
        nationals += [(DIGITS[1:] * 2)[:size] for size in range(18)]
        nationals += [prefix + example for prefix in national_prefixes(code) for example in examples(code)]
        for national in nationals:
            check_fast_path(f"+{code}{national}", "")


@st.composite
def nationals(draw: st.DrawFn, code: int) -> str:
    """Digits after a calling code: random, zeros first, or an example number with a prefix and a slip."""
    shape = draw(st.sampled_from(["random", "zeros", "example"]))
    if shape == "random":
        return draw(st.text(DIGITS, max_size=18))
    if shape == "zeros":
        return "0" * draw(st.integers(1, 3)) + draw(st.text(DIGITS, max_size=15))
    example = draw(st.sampled_from(examples(code)))
    cut = draw(st.integers(0, len(example)))
    slip = draw(st.text(DIGITS, max_size=2))
    return draw(st.sampled_from(national_prefixes(code))) + example[:cut] + slip + example[cut:]


plus_digits = st.sampled_from(CODES).flatmap(lambda code: nationals(code).map(lambda national: f"+{code}{national}"))


@settings(max_examples=3000, deadline=None)
@given(plus_digits, st.sampled_from(REGIONS))
def test_fast_path_is_the_library_for_plus_digits(text: str, region: str) -> None:
    check_fast_path(text, region)


@settings(max_examples=1000, deadline=None)
@given(
    plus_digits,
    st.sampled_from(["{}", "whatsapp:{}", "WhatsApp: {} ", "00{}", "whatsapp:00{}", " {}", "+{}", "{}x1"]),
    st.sampled_from(REGIONS),
)
def test_normalize_is_the_library_for_provider_forms(text: str, form: str, region: str) -> None:
    raw = form.format(text[1:] if "00{}" in form else text)
    expected = outcome(_e164_library, _without_prefixes(raw), region)
    assert outcome(normalize, raw, region) == expected
