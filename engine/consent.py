"""Consent keywords: the inbound words that opt a WhatsApp contact out of messages, or back in.

A message opts out or in only when its whole body (case, accents, surrounding
whitespace and trailing punctuation ignored) is one of the keywords, as Twilio's
own opt-out handling does: "please stop sending me the price list" is not an opt-out.
"""

from __future__ import annotations

import unicodedata
from typing import Literal

OPT_OUT_WORDS = frozenset(
    {
        # English (Twilio's standard opt-out keywords)
        "stop", "stopall", "unsubscribe", "cancel", "end", "quit", "optout", "opt out", "revoke",
        # Spanish
        "baja", "darme de baja", "cancelar", "parar", "detener", "alto", "no mas", "no enviar",
        # Portuguese
        "sair", "parar de receber", "cancelar inscricao", "descadastrar", "remover", "pare",
        # French
        "arret", "arreter", "stop sms", "desabonner", "desinscrire", "se desabonner", "annuler",
    }
)  # fmt: skip
OPT_IN_WORDS = frozenset({"start", "unstop", "subscribe", "optin", "opt in", "alta", "comecar", "iniciar"})

Consent = Literal["opted_out", "opted_in"]


def normalize(body: str) -> str:
    """Lower case, no accents, inner whitespace collapsed, trailing punctuation dropped."""
    decomposed = unicodedata.normalize("NFKD", body.strip().lower())
    plain = "".join(char for char in decomposed if not unicodedata.combining(char))
    return " ".join(plain.split()).strip(".!¡?¿ ")


def consent_keyword(body: str) -> Consent | None:
    """``opted_out`` for a STOP-type message, ``opted_in`` for START/UNSTOP, else None."""
    if len(body) > 64:
        return None
    word = normalize(body)
    if word in OPT_OUT_WORDS:
        return "opted_out"
    if word in OPT_IN_WORDS:
        return "opted_in"
    return None
