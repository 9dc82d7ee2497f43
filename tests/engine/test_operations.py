"""flowchat.operations: operator commands (`executions`, `dlq`, `queue`) as real CLI processes on real state.

Executions are enqueued with the Queue API and run by an in-process Worker; the
CLI runs as a user runs it, in a subprocess from the repo root, on the same Redis.
`executions cancel` stops a queued or waiting execution at once, counted and logged.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import daemon_env, enqueue, lines, run_cli, settled, wait_for, write_flow

from flowchat.catalog import Catalog
from flowchat.flow import Flow
from flowchat.queue import Queue
from flowchat.services import Services
from flowchat.worker import Worker, WorkerSettings

Cli = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]
SETTLED = ("succeeded", "failed")


@pytest.fixture
def cli(redis_url: str) -> Cli:
    """Run ``python -m flowchat.cli ARGS`` against the test Redis (without blocking the event loop)."""
    env = daemon_env(redis_url)

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_cli, *args, env=env, timeout=30)

    return run


@dataclass
class Lab:
    """Flows in a folder, a queue, and a worker to run what was enqueued."""

    folder: Path
    queue: Queue
    catalog_factory: Callable[[Path], Catalog]
    marks: Path
    marker: Path

    def catalog(self) -> Catalog:
        catalog = self.catalog_factory(self.folder)
        assert not catalog.problems, catalog.problems
        return catalog

    def flow(self, name: str) -> Flow:
        flow = self.catalog().get(name)
        assert flow is not None
        return flow

    async def enqueue(self, name: str, payload: dict[str, Any] | None = None) -> str:
        flow = self.flow(name)
        await self.queue.store_flow(flow)
        execution_id, created = await self.queue.enqueue(flow.name, flow.version, payload or {})
        assert created
        return execution_id

    async def status(self, execution_id: str) -> str | None:
        stored = await self.queue.get(execution_id)
        return None if stored is None else stored[0]["status"]

    async def work(self, *execution_ids: str, until: tuple[str, ...] = SETTLED) -> None:
        """Run a worker until every execution has reached one of ``until``."""
        worker = Worker(
            self.queue,
            self.catalog(),
            Services(),
            WorkerSettings(concurrency=4, visibility_timeout=2, block_ms=100),
        )
        task = asyncio.create_task(worker.run())

        async def settled() -> bool:
            return all([await self.status(execution_id) in until for execution_id in execution_ids])

        try:
            await wait_for(settled, timeout=10)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 10)

    def mark_lines(self, execution_id: str, node: str) -> list[str]:
        if not self.marks.exists():
            return []
        return [line for line in self.marks.read_text().splitlines() if line.startswith(f"{execution_id} {node} ")]


@pytest.fixture
def lab(flows_dir: Path, queue: Queue, catalog_factory: Callable[[Path], Catalog], tmp_path: Path) -> Lab:
    marks, marker = tmp_path / "marks.log", tmp_path / "gate-open"
    flows = {
        # succeeds: two nodes that leave a trace
        "greet": [
            {"id": "hello", "type": "test.mark", "with": {"file": str(marks)}},
            {"id": "bye", "type": "test.noop"},
        ],
        # fails for good at `gate` until the marker file exists; `before` has finished by then
        "fragile": [
            {"id": "before", "type": "test.mark", "with": {"file": str(marks)}},
            {"id": "gate", "type": "test.fail_until", "with": {"exists": str(marker), "retryable": False}},
            {"id": "after", "type": "test.mark", "with": {"file": str(marks)}},
        ],
        # fails retryably and waits an hour before its next attempt
        "flaky": [
            {
                "id": "gate",
                "type": "test.fail_until",
                "with": {"exists": str(marker)},
                "retry": {"max_attempts": 3, "backoff": 3600},
            },
        ],
    }
    for name, nodes in flows.items():
        write_flow(flows_dir, name, nodes)
    return Lab(flows_dir, queue, catalog_factory, marks, marker)


def table(stdout: str) -> list[list[str]]:
    """The rows of a CLI table, header dropped, each split on whitespace."""
    return [line.split() for line in stdout.splitlines()[1:] if line.strip()]


# --- executions -----------------------------------------------------------------------


async def test_executions_list_filters_and_limits(lab, cli):
    greet_1 = await lab.enqueue("greet", {"n": 1})
    fragile = await lab.enqueue("fragile")
    greet_2 = await lab.enqueue("greet", {"n": 2})
    await lab.work(greet_1, fragile, greet_2)

    everything = await cli("executions", "list")
    by_flow = await cli("executions", "list", "--flow", "greet", "--json")
    failed = await cli("executions", "list", "--status", "failed")
    newest = await cli("executions", "list", "--limit", "1")

    for result in (everything, by_flow, failed, newest):
        assert result.returncode == 0, result.stderr
    for bad in ("0", "-1", "ten"):  # every listing's --limit: a whole number of rows, 1 or more
        refused = await cli("executions", "list", "--status", "running", "--limit", bad)
        assert refused.returncode == 2 and "--limit" in refused.stderr and "Traceback" not in refused.stderr
    assert everything.stdout.splitlines()[0].split() == ["id", "flow", "status", "created"]
    # newest first
    assert [row[:3] for row in table(everything.stdout)] == [
        [greet_2, "greet", "succeeded"],
        [fragile, "fragile", "failed"],
        [greet_1, "greet", "succeeded"],
    ]
    rows = json.loads(by_flow.stdout)
    assert [(row["id"], row["flow"], row["status"]) for row in rows] == [
        (greet_2, "greet", "succeeded"),
        (greet_1, "greet", "succeeded"),
    ]
    assert [row["trigger"] for row in rows] == [{"n": 2}, {"n": 1}]
    assert [row[:3] for row in table(failed.stdout)] == [[fragile, "fragile", "failed"]]
    assert [row[0] for row in table(newest.stdout)] == [greet_2]


async def test_executions_show_prints_every_node(lab, cli):
    fragile = await lab.enqueue("fragile")
    await lab.work(fragile)

    shown = await cli("executions", "show", fragile)
    as_json = await cli("executions", "show", fragile, "--json")

    assert shown.returncode == 0, shown.stderr
    first, header, *rows = shown.stdout.splitlines()
    assert first.split() == ["execution", fragile, "flow", "fragile", "status", "failed"]
    assert header.split() == ["node", "status", "attempts", "ms", "result"]
    nodes = {row.split()[0]: row.split() for row in rows if not row.startswith("error:")}
    assert set(nodes) == {"before", "gate"}  # `after` never started
    before, gate = nodes["before"], nodes["gate"]
    assert before[1:3] == ["ok", "1"]
    assert float(before[3]) >= 0
    assert json.loads(" ".join(before[4:])) == {"pid": os.getpid()}  # the worker ran in this process
    assert gate[1:3] == ["failed", "1"]
    assert float(gate[3]) >= 0
    assert " ".join(gate[4:]) == f"[test-missing] {lab.marker} is missing"
    assert rows[-1] == f"error: node gate: [test-missing] {lab.marker} is missing"

    assert as_json.returncode == 0, as_json.stderr
    execution = json.loads(as_json.stdout)
    assert execution["id"] == fragile
    assert execution["status"] == "failed"
    assert execution["error"]["code"] == "test-missing"
    assert execution["error"]["node"] == "gate"
    assert execution["nodes"]["before"]["status"] == "ok"
    assert execution["nodes"]["before"]["output"] == {"pid": os.getpid()}
    assert execution["nodes"]["gate"]["status"] == "failed"
    assert execution["nodes"]["gate"]["attempts"] == 1
    assert execution["nodes"]["gate"]["error"]["code"] == "test-missing"
    assert execution["nodes"]["gate"]["duration_ms"] >= 0


async def test_executions_show_an_unknown_id_exits_1(lab, cli):
    result = await cli("executions", "show", "no-such-execution")

    assert result.returncode == 1
    assert "no execution no-such-execution" in result.stderr
    assert result.stdout == ""


# --- dead letters ----------------------------------------------------------------------


async def dead_ids(queue: Queue) -> list[str]:
    return [entry["e"] for entry in await queue.dead_letters()]


async def test_dlq_list_shows_the_failed_node_and_error_code(lab, cli):
    greet = await lab.enqueue("greet")
    fragile = await lab.enqueue("fragile")
    await lab.work(greet, fragile)

    listed = await cli("dlq", "list")
    as_json = await cli("dlq", "list", "--json")

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split() == ["execution", "flow", "node", "error"]
    [row] = table(listed.stdout)
    assert row[:4] == [fragile, "fragile", "gate", "[test-missing]"]
    message = " ".join(row[4:])  # clipped to 80 characters
    assert f"{lab.marker} is missing".startswith(message.removesuffix("…"))
    assert as_json.returncode == 0, as_json.stderr
    [entry] = json.loads(as_json.stdout)
    assert entry["execution_id"] == fragile
    assert entry["flow"] == "fragile"
    assert entry["node"] == "gate"
    assert entry["code"] == "test-missing"
    assert entry["message"] == f"{lab.marker} is missing"


async def test_dlq_replay_resumes_at_the_failed_node(lab, cli):
    fragile = await lab.enqueue("fragile")
    await lab.work(fragile)
    assert await lab.status(fragile) == "failed"
    assert len(lab.mark_lines(fragile, "before")) == 2  # start and done
    lab.marker.touch()

    replayed = await cli("dlq", "replay", fragile)

    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"replayed {fragile}"
    assert await lab.status(fragile) == "queued"
    assert await dead_ids(lab.queue) == []

    await lab.work(fragile)

    assert await lab.status(fragile) == "succeeded"
    # `before` finished before the failure: not run again; `after` ran once
    assert len(lab.mark_lines(fragile, "before")) == 2
    assert len(lab.mark_lines(fragile, "after")) == 2
    _, nodes = await lab.queue.get(fragile)
    assert {node: run["status"] for node, run in nodes.items()} == {"before": "ok", "gate": "ok", "after": "ok"}
    assert nodes["before"]["attempts"] == 1
    assert nodes["gate"]["attempts"] == 1
    assert await lab.queue.redis.xlen(lab.queue.keys.ready) == 0


async def test_dlq_replay_all(lab, cli):
    failed = [await lab.enqueue("fragile", {"n": n}) for n in range(3)]
    greet = await lab.enqueue("greet")
    await lab.work(*failed, greet)
    assert sorted(await dead_ids(lab.queue)) == sorted(failed)
    lab.marker.touch()

    replayed = await cli("dlq", "replay", "--all")

    assert replayed.returncode == 0, replayed.stderr
    assert sorted(replayed.stdout.split()) == sorted(["replayed"] * 3 + failed)
    assert await dead_ids(lab.queue) == []

    await lab.work(*failed)

    assert [await lab.status(execution_id) for execution_id in failed] == ["succeeded"] * 3
    for execution_id in failed:
        assert len(lab.mark_lines(execution_id, "before")) == 2
        assert len(lab.mark_lines(execution_id, "after")) == 2
    assert len(lab.mark_lines(greet, "hello")) == 2


async def test_dlq_replay_needs_an_id_or_all(lab, cli):
    neither = await cli("dlq", "replay")
    unknown = await cli("dlq", "replay", "no-such-execution")

    assert neither.returncode == 2
    assert "--all" in neither.stderr
    assert unknown.returncode == 1
    assert await lab.queue.redis.xlen(lab.queue.keys.ready) == 0


async def test_dlq_replay_leaves_an_execution_that_is_not_dead_alone(lab, cli):
    queued = await lab.enqueue("greet")
    ready_before = await lab.queue.redis.xlen(lab.queue.keys.ready)

    result = await cli("dlq", "replay", queued)

    # replaying what is not in the DLQ would queue it twice and run its nodes twice
    assert result.returncode == 1, result.stdout
    assert await lab.queue.redis.xlen(lab.queue.keys.ready) == ready_before == 1


async def test_dlq_drop_removes_the_dead_letter(lab, cli):
    kept, dropped = await lab.enqueue("fragile"), await lab.enqueue("fragile")
    await lab.work(kept, dropped)

    result = await cli("dlq", "drop", dropped)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dropped 1 dead letter(s) of {dropped}"
    assert await dead_ids(lab.queue) == [kept]
    again = await cli("dlq", "drop", dropped)
    assert again.returncode == 1
    assert again.stdout.strip() == f"dropped 0 dead letter(s) of {dropped}"


# --- queue stats -------------------------------------------------------------------------


async def test_queue_stats_counts_each_state_and_per_flow_totals(lab, cli):
    settled = [await lab.enqueue("greet"), await lab.enqueue("greet"), await lab.enqueue("fragile")]
    flaky = await lab.enqueue("flaky")
    await lab.work(*settled)
    await lab.work(flaky, until=("waiting",))
    in_flight, ready = await lab.enqueue("greet"), await lab.enqueue("greet")
    # another consumer leases the first of the two and never acknowledges it
    [leased] = await lab.queue.read("elsewhere", 1, 100)
    assert leased.execution_id == in_flight

    as_json = await cli("queue", "stats", "--json")
    as_text = await cli("queue", "stats")

    assert as_json.returncode == 0, as_json.stderr
    stats = json.loads(as_json.stdout)
    assert {key: stats[key] for key in ("ready", "in_flight", "delayed", "dead")} == {
        "ready": 1,
        "in_flight": 1,
        "delayed": 1,
        "dead": 1,
    }
    assert stats["counters"]["succeeded:greet"] == 2
    assert stats["counters"]["dead:fragile"] == 1
    assert stats["counters"]["retried:flaky"] == 1
    assert "succeeded:fragile" not in stats["counters"]

    assert as_text.returncode == 0, as_text.stderr
    lines = as_text.stdout.splitlines()
    assert [line.split() for line in lines[:4]] == [["ready", "1"], ["delayed", "1"], ["in_flight", "1"], ["dead", "1"]]
    header = lines[lines.index("") + 1].split()
    assert header == ["flow", "succeeded", "failed", "dead", "retried"]
    rows = table("\n".join(lines[lines.index("") + 1 :]))
    per_flow = {row[0]: dict(zip(header[1:], map(int, row[1:]), strict=True)) for row in rows}
    assert per_flow["greet"]["succeeded"] == 2
    assert per_flow["fragile"]["dead"] == 1
    assert per_flow["fragile"]["succeeded"] == 0
    assert per_flow["flaky"]["retried"] == 1
    assert ready not in as_text.stdout


async def test_executions_show_lists_nodes_in_flow_order(lab, cli):
    greet = await lab.enqueue("greet")
    await lab.work(greet)
    key = lab.queue.keys.execution(greet)
    stored = await lab.queue.redis.hgetall(key)
    # rewrite the hash with the node fields in reverse order: the stored order must not matter
    await lab.queue.redis.delete(key)
    for field in sorted(stored, reverse=True):
        await lab.queue.redis.hset(key, field, stored[field])

    shown = await cli("executions", "show", greet, "--json")

    assert list(json.loads(shown.stdout)["nodes"]) == ["hello", "bye"]


# --- executions cancel ----------------------------------------------------------------


async def test_cancel_a_queued_and_a_waiting_execution(cli, queue, flows_dir, catalog_factory, start_worker, tmp_path):
    marks = tmp_path / "marks"
    write_flow(
        flows_dir,
        "drip",
        [
            {"id": "first", "type": "test.mark", "with": {"file": str(marks)}},
            {"id": "wait", "type": "delay", "with": {"for": "60s"}},
            {"id": "later", "type": "test.mark", "with": {"file": str(marks)}},
        ],
    )
    catalog = catalog_factory(flows_dir)
    queued = await enqueue(queue, catalog, "drip")
    result = await cli("executions", "cancel", queued)
    assert (result.returncode, result.stdout) == (0, f"cancelled {queued}\n"), result.stderr
    assert "cancelled by an operator" in result.stderr  # the audit line

    waiting = await enqueue(queue, catalog, "drip")
    await start_worker(catalog)
    await wait_for(lambda: any(f"{waiting} first done" in line for line in lines(marks)))
    await wait_for(lambda: _status(queue, waiting, "waiting"))
    result = await cli("executions", "cancel", waiting)
    assert result.returncode == 0, result.stderr
    assert await queue.redis.zscore(queue.keys.delayed, waiting) is None

    await wait_for(lambda: _drained(queue))
    assert not any(line.startswith(queued) for line in lines(marks))  # its queue entry was dropped unrun
    assert await queue.next_due() is None  # nothing left to wake the waiting one
    counters = await queue.redis.hgetall(queue.keys.counters)
    assert counters[b"cancelled:drip"] == b"2"

    listed = json.loads((await cli("executions", "list", "--status", "cancelled", "--since", "1h", "--json")).stdout)
    assert {row["id"] for row in listed} == {queued, waiting}
    assert all(row["finished_at"] for row in listed)


async def test_cancel_says_why_it_cannot(cli, queue, flows_dir, catalog_factory, start_worker):
    write_flow(flows_dir, "quick", "- {id: a, type: test.noop}")
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    done = await enqueue(queue, catalog, "quick")
    await settled(queue, done)
    finished = await cli("executions", "cancel", done)
    assert finished.returncode == 1 and f"{done} is succeeded: nothing to cancel" in finished.stderr
    missing = await cli("executions", "cancel", "nope")
    assert missing.returncode == 1 and "no execution nope" in missing.stderr
    for status in ("dead", "cancelled", "queued"):
        assert (await cli("executions", "list", "--status", status)).returncode == 0
    bad = await cli("executions", "list", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr


async def _status(queue, execution_id: str, status: str) -> bool:
    stored = await queue.get(execution_id)
    return stored is not None and stored[0]["status"] == status


async def cancel_while_slow(queue, flows_dir, catalog_factory, start_worker, marks: Path, flow: str, after) -> str:
    """Run ``flow`` — a slow ``test.mark`` node, then the nodes ``after`` — in a worker; cancel it mid-``slow``."""
    slow = {"id": "slow", "type": "test.mark", "with": {"file": str(marks), "sleep": 1.5}}
    write_flow(flows_dir, flow, [slow, *after])
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    running = await enqueue(queue, catalog, flow)
    await wait_for(lambda: any(f"{running} slow start" in line for line in lines(marks)))
    assert await queue.cancel(running) == "cancelled"  # what `executions cancel` calls (its state says queued)
    return running


async def test_a_running_execution_stops_at_its_next_node_boundary(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marks = tmp_path / "marks"
    after = [{"id": "next", "type": "test.mark", "needs": ["slow"], "with": {"file": str(marks)}}]
    running = await cancel_while_slow(queue, flows_dir, catalog_factory, start_worker, marks, "long", after)
    await wait_for(lambda: _status(queue, running, "cancelled"))
    await wait_for(lambda: _drained(queue))
    await asyncio.sleep(0.5)
    assert any(f"{running} slow done" in line for line in lines(marks))  # the node in progress finished
    assert not any(f"{running} next" in line for line in lines(marks))  # nothing after the boundary ran
    counters = await queue.redis.hgetall(queue.keys.counters)
    assert counters.get(b"cancelled:long") == b"1" and b"succeeded:long" not in counters


async def test_a_cancel_stops_every_node_its_boundary_unblocks(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    """Two nodes with effects, unblocked together: both wait for the checkpoint and its cancel flag."""
    marks = tmp_path / "marks"
    mark = {"type": "test.mark", "needs": ["slow"], "with": {"file": str(marks)}}
    after = [mark | {"id": "b"}, mark | {"id": "c"}]
    running = await cancel_while_slow(queue, flows_dir, catalog_factory, start_worker, marks, "fan", after)
    await wait_for(lambda: _status(queue, running, "cancelled"))
    await wait_for(lambda: _drained(queue))
    assert not any(f"{running} b" in line or f"{running} c" in line for line in lines(marks))


async def test_an_execution_that_finishes_before_seeing_the_cancel_keeps_its_outcome(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    """Only pure and idempotent nodes (here a metric) follow the node in progress: they run, and the
    execution is recorded as what it did (succeeded), not as cancelled."""
    marks = tmp_path / "marks"
    after = [{"id": "count", "type": "metric", "with": {"name": "done", "value": 1}}]
    running = await cancel_while_slow(queue, flows_dir, catalog_factory, start_worker, marks, "tail", after)
    await wait_for(lambda: _status(queue, running, "succeeded"))
    counters = await queue.redis.hgetall(queue.keys.counters)
    assert counters.get(b"succeeded:tail") == b"1"


async def _drained(queue) -> bool:
    stats = await queue.stats()
    return stats["ready"] == 0 and stats["in_flight"] == 0


async def test_list_running_shows_what_workers_hold_now(queue, flows_dir, catalog_factory, start_worker, tmp_path):
    from flowchat.operations import list_executions

    marks = tmp_path / "marks"
    write_flow(flows_dir, "long", [{"id": "slow", "type": "test.mark", "with": {"file": str(marks), "sleep": 1.0}}])
    write_flow(flows_dir, "other", [{"id": "a", "type": "test.noop"}])
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    held = await enqueue(queue, catalog, "long")
    await wait_for(lambda: any(f"{held} slow start" in line for line in lines(marks)))
    running = await list_executions(queue, None, "running", 20)
    assert [(row["id"], row["status"]) for row in running] == [(held, "running")]
    assert await list_executions(queue, "other", "running", 20) == []
    await settled(queue, held)
    assert await list_executions(queue, None, "running", 20) == []


async def test_list_running_filters_limits_and_skips_what_expired(lab, cli, redis):
    first = await lab.enqueue("greet")
    await asyncio.sleep(0.02)
    middle = await lab.enqueue("flaky")
    await asyncio.sleep(0.02)
    last = await lab.enqueue("greet")
    expired = await lab.enqueue("greet")
    assert len(await lab.queue.read("elsewhere", 10, 100)) == 4  # held by a worker, not acknowledged
    await redis.delete(lab.queue.keys.execution(expired))  # its state expired while an entry is pending
    created = {row["id"]: row["created_at"] for row in await lab.queue.summaries([first, middle, last])}

    listed = await cli("executions", "list", "--status", "running", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["id"], row["status"]) for row in rows] == [(last, "running"), (middle, "running"), (first, "running")]
    limited = await cli("executions", "list", "--status", "running", "--flow", "greet", "--limit", "1", "--json")
    assert [row["id"] for row in json.loads(limited.stdout)] == [last]
    from flowchat.operations import list_executions

    since = await list_executions(lab.queue, None, "running", 10, since=created[middle])
    assert [row["id"] for row in since] == [last, middle]
    as_text = await cli("executions", "list", "--status", "running")
    assert [line.split()[:3] for line in as_text.stdout.splitlines()[1:]] == [
        [last, "greet", "running"],
        [middle, "flaky", "running"],
        [first, "greet", "running"],
    ]
