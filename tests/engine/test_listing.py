"""Every --json listing has exactly the field names the README documents, with ISO 8601 UTC times."""

from __future__ import annotations

import json
import re

import redis as sync_redis
from support import ROOT, daemon_env, run_cli

from flowchat import listing
from flowchat.keys import Keys

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


def readme_fields(label: str) -> list[str]:
    """The backticked names after ``label:`` on its README line."""
    readme = (ROOT / "README.md").read_text()
    line = next(
        line
        for line in readme.splitlines()
        if line.strip().startswith(f"- {label}") or line.strip().startswith(f"- `{label}")
    )
    return re.findall(r"`([a-z_]+)`", line.split(":", 1)[1])


def test_the_readme_lists_exactly_the_fields_each_listing_prints():
    assert readme_fields("`executions list --json`") == list(listing.EXECUTION_FIELDS)
    assert readme_fields("`dlq list --json`") == list(listing.DEAD_LETTER_FIELDS)
    assert readme_fields("`queue stats --json`") == list(listing.QUEUE_STATS_FIELDS)
    assert readme_fields("`flows`") == list(listing.FLOW_COUNT_FIELDS)
    assert readme_fields("`memory`") == list(listing.MEMORY_FIELDS)


async def test_json_outputs_have_the_documented_names_and_iso_times(redis_url, queue):
    env = daemon_env(redis_url)
    execution_id, _ = await queue.enqueue("greet", "v1", {"n": 1})
    keys = Keys("fc")
    client = sync_redis.Redis.from_url(redis_url)
    client.xadd(keys.dead, {"e": execution_id, "flow": "greet", "node": "a", "code": "boom", "message": "no"})
    client.hincrby(keys.counters, "dead:greet", 1)
    client.close()

    [row] = json.loads(run_cli("executions", "list", "--json", env=env).stdout)
    assert list(row) == list(listing.EXECUTION_FIELDS)
    assert ISO.match(row["created_at"]) and row["finished_at"] is None

    [letter] = json.loads(run_cli("dlq", "list", "--json", env=env).stdout)
    assert list(letter) == list(listing.DEAD_LETTER_FIELDS)
    assert letter["execution_id"] == execution_id and ISO.match(letter["dead_at"])

    stats = json.loads(run_cli("queue", "stats", "--json", env=env).stdout)
    assert list(stats) == list(listing.QUEUE_STATS_FIELDS)
    assert list(stats["flows"]["greet"]) == list(listing.FLOW_COUNT_FIELDS) and stats["flows"]["greet"]["dead"] == 1
    assert list(stats["memory"]) == list(listing.MEMORY_FIELDS)
    assert stats["memory"]["used_memory_bytes"] > 0 and stats["memory"]["bytes_per_live_execution"] > 0
