"""``flowchat messages`` text output: phones masked as in logs, times readable; ``--json`` stays raw."""

from __future__ import annotations

from flowchat.whatsapp_cli import show_lines


def test_messages_show_masks_phones_and_prints_status_times_in_utc() -> None:
    message = {
        "sid": "SM1", "to": "+15551234567", "from": "", "status": "delivered", "previous": "simulated",
        "created_at": "1796041236595", "at:delivered": "1796041246579", "body": "hi",
    }  # fmt: skip
    shown = dict(line.split(None, 1) if " " in line.strip() else (line.strip(), "") for line in show_lines(message))
    assert shown["to"] == "+1555***4567"
    assert "1234567" not in "\n".join(show_lines(message))
    assert shown["at:delivered"] == "2026-11-30 12:20:46.579 UTC"
    assert shown["created_at"].endswith(".595 UTC") and shown["status"] == "delivered"
    assert show_lines({"updated_at": "not-a-time"}) == ["updated_at     not-a-time"]
