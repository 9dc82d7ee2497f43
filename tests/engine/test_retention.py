"""Bounded history: FLOWCHAT_RETENTION_SUCCEEDED / _FAILED and FLOWCHAT_DEDUPE_TTL reach Redis TTLs."""

from __future__ import annotations

import time

import pytest

from flowchat.connections import open_queue, retention
from flowchat.queue import Retention
from flowchat.settings import Settings, SettingsError


def test_retention_settings_read_durations_with_defaults():
    default = retention(Settings.from_env({}))
    assert (default.succeeded, default.failed, default.dedupe) == (86400, 7 * 86400, 86400)
    custom = retention(
        Settings.from_env(
            {"FLOWCHAT_RETENTION_SUCCEEDED": "2h", "FLOWCHAT_RETENTION_FAILED": "3d", "FLOWCHAT_DEDUPE_TTL": "600"}
        )
    )
    assert custom == Retention(7200, 3 * 86400, 600)
    with pytest.raises(SettingsError, match="FLOWCHAT_DEDUPE_TTL"):
        Settings.from_env({"FLOWCHAT_DEDUPE_TTL": "a while"})


def test_an_execution_keeps_its_state_for_the_retention_of_how_it_ended():
    rules = Retention(succeeded=100, failed=200, dedupe=50)
    assert rules.after("done", "succeeded") == 100
    assert rules.after("done", "failed") == 200
    assert rules.after("dead", "failed") == 200
    assert rules.after("wait", "waiting") == 0
    assert rules.longest == 200


async def test_idempotency_keys_live_for_the_dedupe_ttl_and_old_dead_letters_are_trimmed(redis_url):
    settings = Settings.from_env({"FLOWCHAT_REDIS_URL": redis_url, "FLOWCHAT_DEDUPE_TTL": "90s"})
    async with open_queue(settings) as queue:
        await queue.enqueue("f", "v1", {}, idempotency_key="k")
        assert 0 < await queue.redis.ttl(queue.keys.dedupe("f:k")) <= 90
        old = int((time.time() - 8 * 86400) * 1000)
        await queue.redis.xadd(queue.keys.dead, {"e": "old"}, id=f"{old}-0")
        await queue.redis.xadd(queue.keys.dead, {"e": "new"})
        await queue.forget_expired()
        assert [fields[b"e"] for _, fields in await queue.redis.xrange(queue.keys.dead)] == [b"new"]
