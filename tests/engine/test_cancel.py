"""`flowchat executions cancel ID`: a queued or waiting execution stops at once, counted and logged."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from support import ROOT, daemon_env, enqueue, lines, settled, wait_for, write_flow


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowchat.cli", *args],
        cwd=ROOT,
        env=daemon_env(redis_url),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cancel_a_queued_and_a_waiting_execution(
    redis_url, queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marks = tmp_path / "marks"
    write_flow(
        flows_dir,
        "drip",
        f"  - {{id: first, type: test.mark, with: {{file: '{marks}'}}}}\n"
        "  - {id: wait, type: delay, with: {for: 60s}}\n"
        f"  - {{id: later, type: test.mark, with: {{file: '{marks}'}}}}\n",
    )
    catalog = catalog_factory(flows_dir)
    queued = await enqueue(queue, catalog, "drip")
    result = await asyncio.to_thread(cli, redis_url, "executions", "cancel", queued)
    assert (result.returncode, result.stdout) == (0, f"cancelled {queued}\n"), result.stderr
    assert "cancelled by an operator" in result.stderr  # the audit line

    waiting = await enqueue(queue, catalog, "drip")
    await start_worker(catalog)
    await wait_for(lambda: any(f"{waiting} first done" in line for line in lines(marks)))
    await wait_for(lambda: _status(queue, waiting, "waiting"))
    result = await asyncio.to_thread(cli, redis_url, "executions", "cancel", waiting)
    assert result.returncode == 0, result.stderr
    assert await queue.redis.zscore(queue.keys.delayed, waiting) is None

    await wait_for(lambda: _drained(queue))
    assert not any(line.startswith(queued) for line in lines(marks))  # its queue entry was dropped unrun
    assert await queue.next_due() is None  # nothing left to wake the waiting one
    counters = await queue.redis.hgetall(queue.keys.counters)
    assert counters[b"cancelled:drip"] == b"2"

    listed = json.loads(
        (
            await asyncio.to_thread(
                cli, redis_url, "executions", "list", "--status", "cancelled", "--since", "1h", "--json"
            )
        ).stdout
    )
    assert {row["id"] for row in listed} == {queued, waiting}
    assert all(row["finished_at"] for row in listed)


async def test_cancel_says_why_it_cannot(redis_url, queue, flows_dir, catalog_factory, start_worker):
    write_flow(flows_dir, "quick", "  - {id: a, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    done = await enqueue(queue, catalog, "quick")
    await settled(queue, done)
    finished = await asyncio.to_thread(cli, redis_url, "executions", "cancel", done)
    assert finished.returncode == 1 and f"{done} is succeeded: nothing to cancel" in finished.stderr
    missing = await asyncio.to_thread(cli, redis_url, "executions", "cancel", "nope")
    assert missing.returncode == 1 and "no execution nope" in missing.stderr
    for status in ("dead", "cancelled", "queued"):
        assert (await asyncio.to_thread(cli, redis_url, "executions", "list", "--status", status)).returncode == 0
    bad = await asyncio.to_thread(cli, redis_url, "executions", "list", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr


async def _status(queue, execution_id: str, status: str) -> bool:
    stored = await queue.get(execution_id)
    return stored is not None and stored[0]["status"] == status


async def test_a_running_execution_stops_at_its_next_node_boundary(
    redis_url, queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marks = tmp_path / "marks"
    write_flow(
        flows_dir,
        "long",
        f"  - {{id: slow, type: test.mark, with: {{file: '{marks}', sleep: 1.5}}}}\n"
        f"  - {{id: next, type: test.mark, needs: [slow], with: {{file: '{marks}'}}}}\n",
    )
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    running = await enqueue(queue, catalog, "long")
    await wait_for(lambda: any(f"{running} slow start" in line for line in lines(marks)))
    assert await queue.cancel(running) == "cancelled"  # what `executions cancel` calls (its state says queued)
    await wait_for(lambda: _status(queue, running, "cancelled"))
    await wait_for(lambda: _drained(queue))
    await asyncio.sleep(0.5)
    assert any(f"{running} slow done" in line for line in lines(marks))  # the node in progress finished
    assert not any(f"{running} next" in line for line in lines(marks))  # nothing after the boundary ran
    counters = await queue.redis.hgetall(queue.keys.counters)
    assert counters.get(b"cancelled:long") == b"1" and b"succeeded:long" not in counters


async def _drained(queue) -> bool:
    stats = await queue.stats()
    return stats["ready"] == 0 and stats["in_flight"] == 0
