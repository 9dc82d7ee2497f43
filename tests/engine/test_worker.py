"""Workers over a real Redis: checkpoints, retries through the delayed set, dead letters, leases."""

from __future__ import annotations

import asyncio
import time

from support import enqueue, fail_until, flow_yaml, lines, mark_node, settled, wait_for, write_flow

from flowchat import Services
from flowchat.keys import GROUP
from flowchat.operations import load_execution, replay
from flowchat.queue import Retention
from flowchat.worker import Worker, WorkerSettings


async def test_an_execution_runs_to_success_and_its_entry_is_acknowledged(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marks = tmp_path / "marks"
    write_flow(
        flows_dir,
        "two",
        [mark_node(marks, "a"), {"id": "b", "type": "set", "with": {"values": {"x": "{{ a.pid }}"}}}],
    )
    catalog = catalog_factory(flows_dir)
    queue.retention = Retention(compact=False)  # keep the outputs after success: the test reads one
    await start_worker(catalog)
    execution_id = await enqueue(queue, catalog, "two")

    meta = await settled(queue, execution_id)

    assert meta["status"] == "succeeded"
    execution = await load_execution(queue, execution_id)
    assert execution is not None
    assert [run.status for run in execution.nodes.values()] == ["ok", "ok"]
    assert isinstance(execution.nodes["b"].output["x"], int)
    assert await queue.redis.xlen(queue.keys.ready) == 0  # acknowledged and deleted, not left behind
    assert (await queue.redis.xpending(queue.keys.ready, GROUP))["pending"] == 0


async def test_a_retryable_failure_waits_in_the_delayed_set_without_holding_a_worker(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marker = tmp_path / "ready"
    write_flow(
        flows_dir,
        "flaky",
        [fail_until(marker, retry={"max_attempts": 50, "backoff": "300ms", "max_backoff": "300ms"})],
    )
    catalog = catalog_factory(flows_dir)
    worker = await start_worker(catalog, concurrency=1)
    execution_id = await enqueue(queue, catalog, "flaky")

    async def parked() -> bool:
        return await queue.redis.zscore(queue.keys.delayed, execution_id) is not None

    await wait_for(parked)
    assert worker.in_flight == {}  # the single slot is free while it waits
    stored = await load_execution(queue, execution_id)
    assert stored is not None and stored.nodes["call"].status == "waiting"
    assert stored.nodes["call"].error is not None and stored.nodes["call"].error["code"] == "test-missing"

    marker.touch()
    meta = await settled(queue, execution_id)
    assert meta["status"] == "succeeded"
    final = await load_execution(queue, execution_id)
    assert final is not None and final.nodes["call"].attempts >= 2


async def test_a_non_retryable_failure_is_dead_lettered_with_its_error_and_replay_resumes_at_the_failed_node(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marks, marker = tmp_path / "marks", tmp_path / "fixed"
    write_flow(
        flows_dir,
        "fragile",
        [mark_node(marks, "first"), fail_until(marker, "second", retryable=False), mark_node(marks, "third")],
    )
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    execution_id = await enqueue(queue, catalog, "fragile")

    meta = await settled(queue, execution_id)
    assert meta["status"] == "failed"
    assert meta["error"]["node"] == "second" and meta["error"]["code"] == "test-missing"
    [letter] = await queue.dead_letters()
    assert (letter["e"], letter["node"], letter["code"]) == (execution_id, "second", "test-missing")
    assert "is missing" in letter["message"]

    marker.touch()
    assert await replay(queue, execution_id) is not None
    assert await queue.dead_letters() == []
    meta = await settled(queue, execution_id)

    assert meta["status"] == "succeeded"
    ran = [line.split()[1] for line in lines(marks) if " start" in line]
    assert ran == ["first", "third"]  # `first` finished before the failure and was not run again


async def test_exhausted_attempts_fail_the_execution(queue, flows_dir, catalog_factory, start_worker, tmp_path):
    write_flow(
        flows_dir,
        "doomed",
        [fail_until(tmp_path / "never", retry={"max_attempts": 3, "backoff": "10ms"})],
    )
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    execution_id = await enqueue(queue, catalog, "doomed")

    meta = await settled(queue, execution_id)

    execution = await load_execution(queue, execution_id)
    assert meta["status"] == "failed"
    assert execution is not None and execution.nodes["call"].attempts == 3
    assert [letter["e"] for letter in await queue.dead_letters()] == [execution_id]


async def test_a_message_delivered_too_often_is_dead_lettered_as_poison(
    queue, flows_dir, catalog_factory, start_worker
):
    write_flow(flows_dir, "calm", "  - {id: a, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    execution_id = await enqueue(queue, catalog, "calm")
    # as if earlier workers had picked it up and died each time
    await queue.redis.hset(queue.keys.execution(execution_id), "d", queue.max_deliveries)

    await start_worker(catalog)
    meta = await settled(queue, execution_id)

    assert meta["status"] == "failed" and meta["error"]["code"] == "poison"
    assert [letter["code"] for letter in await queue.dead_letters()] == ["poison"]


async def test_a_delay_node_parks_the_execution_until_it_is_due(queue, flows_dir, catalog_factory, start_worker):
    write_flow(
        flows_dir, "later", "  - {id: wait, type: delay, with: {for: 400ms}}\n  - {id: after, type: test.noop}\n"
    )
    catalog = catalog_factory(flows_dir)
    worker = await start_worker(catalog, concurrency=1)
    started = time.time()
    execution_id = await enqueue(queue, catalog, "later")

    async def parked() -> bool:
        return await queue.redis.zscore(queue.keys.delayed, execution_id) is not None

    await wait_for(parked)
    assert worker.in_flight == {}
    meta = await settled(queue, execution_id)

    assert meta["status"] == "succeeded"
    assert meta["finished_at"] - started >= 0.4


async def test_an_execution_finishes_on_the_flow_version_it_started_with(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marks = tmp_path / "marks"
    path = write_flow(
        flows_dir, "versioned", "  - {id: wait, type: delay, with: {for: 300ms}}\n  - {id: v1, type: test.noop}\n"
    )
    catalog = catalog_factory(flows_dir)
    execution_id = await enqueue(queue, catalog, "versioned")
    await start_worker(catalog)

    async def parked() -> bool:
        return await queue.redis.zscore(queue.keys.delayed, execution_id) is not None

    await wait_for(parked)
    edited = [{"id": "wait", "type": "delay", "with": {"for": "1ms"}}, mark_node(marks, "v2")]
    path.write_text(flow_yaml("versioned", edited))
    assert catalog.reload()
    assert "v2" in catalog.get("versioned").nodes  # type: ignore[union-attr]

    await settled(queue, execution_id)
    execution = await load_execution(queue, execution_id)
    assert execution is not None and set(execution.nodes) == {"wait", "v1"}
    assert not marks.exists()


async def test_leases_are_renewed_while_a_long_node_runs(queue, flows_dir, catalog_factory, start_worker, tmp_path):
    marks = tmp_path / "marks"
    write_flow(flows_dir, "long", [mark_node(marks, "slow", sleep=1.6) | {"timeout": "10s"}])
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog, visibility_timeout=0.6)
    await start_worker(catalog, visibility_timeout=0.6)  # a second worker that would steal an expired lease
    execution_id = await enqueue(queue, catalog, "long")

    meta = await settled(queue, execution_id)

    assert meta["status"] == "succeeded"
    assert [line.rsplit(" ", 1)[0] for line in lines(marks) if " start" in line] == [f"{execution_id} slow start"]


async def test_index_entries_past_retention_are_forgotten(queue, flows_dir, catalog_factory):
    from flowchat.queue import RETENTION, RETENTION_SUCCEEDED

    write_flow(flows_dir, "old", "  - {id: a, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    kept = await enqueue(queue, catalog, "old")
    two_days = time.time() - RETENTION_SUCCEEDED - 10
    await queue.redis.zadd(queue.keys.index("old", "succeeded"), {"done-long-ago": two_days})
    await queue.redis.zadd(queue.keys.index("old", "failed"), {"failed-two-days-ago": two_days})
    await queue.redis.zadd(queue.keys.index("old", "failed"), {"failed-long-ago": time.time() - RETENTION - 10})
    await queue.redis.zadd(queue.keys.index("old", "waiting"), {"waiting-long": time.time() - RETENTION - 10})

    assert await queue.forget_expired() == 2  # each status by its own retention; live ones stay
    assert await queue.redis.zrange(queue.keys.index("old", "queued"), 0, -1) == [kept.encode()]
    assert await queue.redis.zrange(queue.keys.index("old", "failed"), 0, -1) == [b"failed-two-days-ago"]
    assert await queue.redis.zrange(queue.keys.index("old", "waiting"), 0, -1) == [b"waiting-long"]
    assert not await queue.redis.exists(queue.keys.index("old", "succeeded"))


async def test_replay_on_the_latest_version_applies_a_fix_made_in_the_flow_file(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marks, missing, present = tmp_path / "marks", tmp_path / "missing", tmp_path / "present"
    present.touch()
    path = write_flow(flows_dir, "fixable", [mark_node(marks, "first"), fail_until(missing, retryable=False)])
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    execution_id = await enqueue(queue, catalog, "fixable")
    assert (await settled(queue, execution_id))["status"] == "failed"
    old_version = catalog.get("fixable").version  # type: ignore[union-attr]

    path.write_text(path.read_text().replace(str(missing), str(present)))
    assert catalog.reload()
    assert await replay(queue, execution_id, latest=catalog.flows) is not None
    meta = await settled(queue, execution_id)

    assert meta["status"] == "succeeded"
    assert meta["flow_version"] != old_version
    assert [line.split()[1] for line in lines(marks) if " start" in line] == ["first"]


async def test_a_worker_whose_lease_was_taken_stops_its_copy_and_writes_no_outcome(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marks = tmp_path / "marks"
    write_flow(flows_dir, "stolen", [mark_node(marks, "slow", sleep=3)])
    catalog = catalog_factory(flows_dir)
    worker = await start_worker(catalog, visibility_timeout=0.6)
    execution_id = await enqueue(queue, catalog, "stolen")
    await wait_for(lambda: any(" start" in line for line in lines(marks)))

    [entry] = await queue.redis.xpending_range(queue.keys.ready, "workers", "-", "+", 10)
    await queue.redis.xclaim(queue.keys.ready, "workers", "thief", 0, [entry["message_id"]], justid=True)
    await wait_for(lambda: not worker.in_flight, timeout=5)

    assert not any(" done" in line for line in lines(marks))
    stored = await queue.get(execution_id)
    assert stored is not None and stored[0]["status"] == "queued"
    [still] = await queue.redis.xpending_range(queue.keys.ready, "workers", "-", "+", 10)
    assert still["consumer"] == b"thief"


async def test_a_stored_version_rebuilt_by_another_worker_finds_files_next_to_its_flow(
    queue, flows_dir, catalog_factory, start_worker
):
    (flows_dir / "lead.schema.json").write_text('{"type": "object", "required": ["phone"]}')
    path = write_flow(flows_dir, "schema_v", "  - {id: check, type: validate, with: {schema_file: lead.schema.json}}\n")
    first_catalog = catalog_factory(flows_dir)
    execution_id = await enqueue(queue, first_catalog, "schema_v", {"phone": "+14155550123"})
    path.write_text(path.read_text() + "  - {id: extra, type: test.noop}\n")  # a new version on disk

    fresh_catalog = catalog_factory(flows_dir)  # a worker that never saw the first version
    await start_worker(fresh_catalog)
    meta = await settled(queue, execution_id)

    assert meta["status"] == "succeeded", meta
    execution = await load_execution(queue, execution_id)
    assert execution is not None and set(execution.nodes) == {"check"}


async def test_metrics_count_executions_and_time_nodes_and_any_process_sees_cluster_totals(
    queue, flows_dir, catalog_factory
):
    from prometheus_client.parser import text_string_to_metric_families

    from flowchat.metrics import Metrics

    write_flow(flows_dir, "counted", "  - {id: a, type: test.noop}\n  - {id: b, type: set, with: {values: {}}}\n")
    catalog = catalog_factory(flows_dir)
    worker_metrics = Metrics()
    worker = Worker(queue, catalog, Services(), WorkerSettings(concurrency=4, block_ms=50), worker_metrics)
    task = asyncio.create_task(worker.run())
    ids = [await enqueue(queue, catalog, "counted") for _ in range(3)]
    for execution_id in ids:
        await settled(queue, execution_id)
    worker.stop()
    await task

    def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for sample in family.samples
        }

    seen = samples(worker_metrics)
    assert seen[("flowchat_executions_total", (("event", "started"), ("flow", "counted")))] == 3
    assert seen[("flowchat_executions_total", (("event", "succeeded"), ("flow", "counted")))] == 3
    assert seen[("flowchat_node_duration_seconds_count", (("status", "ok"), ("type", "test.noop")))] == 3
    assert seen[("flowchat_node_duration_seconds_bucket", (("le", "+Inf"), ("status", "ok"), ("type", "set")))] == 3

    ingress_metrics = Metrics()  # e.g. `serve --no-workers` on another box
    ingress_metrics.set_queue(await queue.stats())
    cluster = samples(ingress_metrics)
    key = (("event", "succeeded"), ("flow", "counted"), ("scope", "cluster"))
    assert cluster[("flowchat_cluster_executions_total", key)] == 3  # a counter: rate() works on it


async def test_an_execution_that_finished_late_stays_listed_while_its_state_is_kept(queue, flows_dir, catalog_factory):
    from flowchat.queue import RETENTION_SUCCEEDED

    write_flow(flows_dir, "drip", "  - {id: a, type: test.noop}\n")
    catalog_factory(flows_dir)
    await queue.redis.sadd(queue.keys.indexed_flows, "drip")
    index = queue.keys.index("drip", "succeeded")
    created_two_days_ago = time.time() - RETENTION_SUCCEEDED - 3600  # a drip: created long ago, finished now
    await queue.redis.zadd(index, {"finished-just-now": created_two_days_ago})
    await queue.redis.hset(queue.keys.execution("finished-just-now"), "z", "kept for a day from its finish")

    assert await queue.forget_expired() == 0
    assert await queue.redis.zrange(index, 0, -1) == [b"finished-just-now"]
    await queue.redis.delete(queue.keys.execution("finished-just-now"))  # its retention ran out
    assert await queue.forget_expired() == 1
    assert not await queue.redis.exists(index)


def test_replies_that_mean_try_later_leave_work_for_take_over_whatever_redis_py_raises() -> None:
    """redis-py strips OOM, LOADING, READONLY … from the message of the classes it raises for them."""
    from redis._parsers.base import BaseParser
    from redis.exceptions import ResponseError

    from flowchat.worker import redis_unreachable

    for reply in ("OOM command not allowed", "LOADING Redis is loading", "READONLY You can't write",
                  "MASTERDOWN Link is down", "TRYAGAIN Multiple keys", "CLUSTERDOWN The cluster is down",
                  "BUSY Redis is busy running a script"):  # fmt: skip
        assert redis_unreachable(BaseParser.parse_error(reply)), reply
    assert not redis_unreachable(BaseParser.parse_error("ERR wrong number of arguments"))
    assert not redis_unreachable(ResponseError("WRONGTYPE Operation against a key"))
