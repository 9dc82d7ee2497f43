"""flowchat.consent: the inbound words that opt a WhatsApp contact out of messages, or back in."""

import pytest

from flowchat.consent import consent_keyword


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("STOP", "opted_out"), ("  stop  ", "opted_out"), ("Stop.", "opted_out"), ("STOPALL", "opted_out"),
        ("unsubscribe", "opted_out"), ("CANCEL", "opted_out"), ("end", "opted_out"), ("quit", "opted_out"),
        ("BAJA", "opted_out"), ("parar", "opted_out"), ("Cancelar", "opted_out"),
        ("SAIR", "opted_out"), ("descadastrar", "opted_out"),
        ("ARRÊT", "opted_out"), ("arrêter", "opted_out"), ("désabonner", "opted_out"),
        ("START", "opted_in"), ("unstop", "opted_in"),
        ("please stop sending me the price list", None), ("hello", None), ("", None),
    ],
)  # fmt: skip
def test_consent_keywords_in_four_languages(body, expected):
    assert consent_keyword(body) == expected
