"""Payload parsing: the form parser is parse_qsl's exact equal."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from hypothesis import given, settings
from hypothesis import strategies as st

from flowchat.payloads import form_pairs

pieces = st.sampled_from(["&", "=", "+", "%", "%2", "%2B", "%C3%A7", "%ZZ", "%e2%82", "a", "B", " ", "ç", ";", "\x00"])


@settings(max_examples=500, deadline=None)
@given(st.lists(pieces | st.text(max_size=4), max_size=20).map("".join))
def test_form_pairs_is_parse_qsl_with_blank_values(text):
    assert form_pairs(text) == parse_qsl(text, keep_blank_values=True)


def test_a_twilio_form():
    params = {"Body": "Oi, quero saber o preço & mais", "From": "whatsapp:+5511987654321", "Empty": ""}

    assert form_pairs(urlencode(params)) == list(params.items())
    assert form_pairs("a=1&a=2&&b&=c") == [("a", "1"), ("a", "2"), ("b", ""), ("", "c")]
