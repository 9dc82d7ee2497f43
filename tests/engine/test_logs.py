"""flowchat.logs: phone numbers masked in every format people write them, in tracebacks too, cheaply."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from flowchat.logs import RedactingFormatter, mask_phones

PHONE = "+14155550123"
MASKED = "+1415***0123"


@pytest.mark.parametrize(
    ("text", "region", "masked"),
    [
        ("call +44 20 7946 0958 now", "", "call +4420***0958 now"),
        ("+14155554567", "", "+1415***4567"),
        ("(415) 555-0123", "", "415***0123"),
        ("call 020 7946 0958 now", "GB", "call +4420***0958 now"),
        ("rappelle au 06 12 34 56 78 stp", "FR", "rappelle au +3361***5678 stp"),
        ("ligue (11) 91234-5678", "BR", "ligue +5511***5678"),
        ("00 44 20 7946 0958", "", "+4420***0958"),
        ("00 44 20 7946 0958", "US", "+4420***0958"),
        ("body: 'my number is 020 7946 0958, thanks'", "GB", "body: 'my number is +4420***0958, thanks'"),
    ],
)
def test_phone_numbers_are_masked_in_every_format(text: str, region: str, masked: str) -> None:
    assert mask_phones(text, region) == masked


@pytest.mark.parametrize(
    "text",
    [
        "order 123456789 shipped",
        "2026-11-30 10:31:35,123 INFO started",
        "execution 01a22c2f993f31442fc4c89d took 1234 ms",
        "amount 1234567.89 EUR",
        "timestamp 1701234567890",
    ],
)
def test_order_numbers_dates_and_ids_are_not_phone_numbers(text: str) -> None:
    assert mask_phones(text, "GB") == text


def test_masking_stays_cheap_on_ordinary_log_lines() -> None:
    line = "2026-11-30 10:31:35,123 INFO flowchat.execution 01a22c2f993f hello <- set {'name': 'ada', 'n': 3} in 2 ms"
    started = time.perf_counter()
    for _ in range(2000):
        mask_phones(line, "GB")
    per_line = (time.perf_counter() - started) / 2000
    assert per_line < 200e-6, f"{per_line * 1e6:.0f} us per line"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PHONE, MASKED),
        (f"whatsapp:{PHONE}", f"whatsapp:{MASKED}"),
        ("call 4155550123 now", "call 415***0123 now"),
        ("two: +14155550123, +5511998765432", "two: +1415***0123, +5511***5432"),
        ("order 42 at 10:30", "order 42 at 10:30"),
    ],
)
def test_mask_phones_keeps_enough_to_tell_numbers_apart(text, expected):
    assert mask_phones(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("%2B14155550123", "+1415***0123"),
        ("+1 415 555 0123", "+1415***0123"),
        ("(415) 555-0123", "415***0123"),
        ("on 2026-11-27 at 12:33:54", "on 2026-11-27 at 12:33:54"),
    ],
)
def test_mask_phones_sees_numbers_written_with_separators_but_not_dates(text, expected):
    assert mask_phones(text) == expected


def test_tracebacks_are_masked_by_the_daemon_formatter():
    try:
        raise ValueError("cannot reach +14155550123")
    except ValueError:
        record = logging.LogRecord("flowchat", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = RedactingFormatter("%(message)s").format(record)

    assert "ValueError: cannot reach +1415***0123" in line
    assert "4155550123" not in line
