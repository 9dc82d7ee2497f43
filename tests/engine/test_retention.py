"""Bounded history: FLOWCHAT_RETENTION_SUCCEEDED / _FAILED and FLOWCHAT_DEDUPE_TTL reach Redis TTLs;
a succeeded execution keeps a compact summary, a failed one what replay needs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from support import ROOT, daemon_env, enqueue, fail_until, mark_node, settled, wait_for, write_flow

from flowchat.connections import open_queue, retention
from flowchat.keys import GROUP
from flowchat.queue import RETENTION_SUCCEEDED, Retention
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
    assert default.compact and not retention(Settings.from_env({"FLOWCHAT_COMPACT_SUCCEEDED": "0"})).compact
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


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowchat.cli", *args],
        cwd=ROOT,
        env=daemon_env(redis_url),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_succeeded_execution_keeps_a_compact_summary_and_a_failed_one_keeps_what_replay_needs(
    queue, redis_url, flows_dir, catalog_factory, processes, tmp_path
):
    marker = tmp_path / "fixed"
    values = {"name": "{{ trigger.name }}", "note": '{{ trigger.note | default("") }}'}
    write_flow(
        flows_dir,
        "intake",
        [
            {"id": "check", "type": "set", "with": {"values": values}},
            fail_until(marker, "gate", retryable=False),
            {"id": "done", "type": "set", "with": {"values": {"greeting": "hello {{ check.name }}"}}},
        ],
    )
    catalog = catalog_factory(flows_dir)
    processes.start("worker", "--flows", str(flows_dir), env=daemon_env(redis_url))
    big = {"name": "Ada", "note": "x" * 200}  # a trigger over 64 bytes is not kept once succeeded
    failed = await enqueue(queue, catalog, "intake", big)
    assert (await settled(queue, failed))["status"] == "failed"
    marker.touch()
    small, large = await enqueue(queue, catalog, "intake", {"name": "Bo"}), await enqueue(queue, catalog, "intake", big)
    for execution_id in (small, large):
        assert (await settled(queue, execution_id))["status"] == "succeeded"

    # succeeded: one small hash (Redis's listpack encoding), no outputs, the trigger only when small
    for execution_id, kept in ((small, {"t"}), (large, set())):
        key = queue.keys.execution(execution_id)
        fields = {field.decode() for field in await queue.redis.hkeys(key)}
        assert fields == {"z", "f", "n:check", "n:gate", "n:done"} | kept
        assert await queue.redis.object("encoding", key) == b"listpack"
        assert await queue.redis.memory_usage(key) <= 320
        assert 0 < await queue.redis.ttl(key) <= RETENTION_SUCCEEDED
    shown = json.loads(_cli(redis_url, "executions", "show", large, "--json").stdout)
    assert shown["status"] == "succeeded" and shown["trigger"] is None and shown["finished_at"] >= shown["started_at"]
    assert {
        node: (run["type"], run["status"], run["attempts"], run["output"]) for node, run in shown["nodes"].items()
    } == {
        "check": ("set", "ok", 1, None),
        "gate": ("test.fail_until", "ok", 1, None),
        "done": ("set", "ok", 1, None),
    }
    assert json.loads(_cli(redis_url, "executions", "show", small, "--json").stdout)["trigger"] == {"name": "Bo"}
    text = _cli(redis_url, "executions", "show", large)
    assert text.returncode == 0 and "status succeeded" in text.stdout
    assert "outputs of a succeeded execution are not retained" in text.stdout and "node_runs" in text.stdout
    listed = json.loads(_cli(redis_url, "executions", "list", "--status", "succeeded", "--json").stdout)
    assert [(row["id"], row["flow"], row["trigger"]) for row in listed] == [
        (large, "intake", None),
        (small, "intake", {"name": "Bo"}),
    ]

    # failed: the full state stays (trigger, outputs of the nodes before the failure), so replay resumes
    stored = await queue.stored(failed)
    assert stored is not None and not stored.compact
    assert stored.meta["trigger"] == big and stored.nodes["check"]["output"] == {"name": "Ada", "note": "x" * 200}
    assert "not retained" not in _cli(redis_url, "executions", "show", failed).stdout
    replayed = _cli(redis_url, "dlq", "replay", failed)
    assert replayed.returncode == 0, replayed.stderr
    assert (await settled(queue, failed))["status"] == "succeeded"
    again = await queue.stored(failed)
    assert again is not None and again.compact and again.nodes["done"]["attempts"] == 1
    assert again.nodes["check"]["attempts"] == 1  # not run again: resumed at the failed node


async def test_a_delivery_of_a_succeeded_execution_is_dropped_not_run_again(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marks = tmp_path / "marks"
    write_flow(flows_dir, "once", [mark_node(marks, "a")])
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    execution_id = await enqueue(queue, catalog, "once")
    await settled(queue, execution_id)
    size = await queue.redis.memory_usage(queue.keys.execution(execution_id))

    await queue.redis.xadd(queue.keys.ready, {"e": execution_id})  # a stray copy of its entry
    await wait_for(lambda: _drained(queue))

    assert [line.split()[2] for line in marks.read_text().splitlines()] == ["start", "done"]  # ran once
    assert await queue.redis.hget(queue.keys.counters, "succeeded:once") == b"1"
    assert await queue.redis.memory_usage(queue.keys.execution(execution_id)) == size  # no delivery count left


async def _drained(queue) -> bool:
    return (
        await queue.redis.xlen(queue.keys.ready) == 0
        and (await queue.redis.xpending(queue.keys.ready, GROUP))["pending"] == 0
    )
