"""flowchat.phones: one normal form (E.164) for keys, one mask for people."""

from __future__ import annotations

import pytest

from flowchat import NodeError
from flowchat.phones import mask, normalize


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
