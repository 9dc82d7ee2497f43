"""Capacity: bytes per live and per finished execution, of either stored form, and the rate."""

from __future__ import annotations

from support import enqueue, settled, write_flow

from flowchat.capacity import lines, measure


async def test_bytes_per_execution_count_the_hash_and_its_index_entry(queue, flows_dir, catalog_factory, start_worker):
    write_flow(flows_dir, "sized", "  - {id: a, type: test.noop}\n  - {id: b, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    waiting = [await enqueue(queue, catalog, "sized", {"note": "x" * 400}) for _ in range(3)]
    live = await measure(queue)
    assert live.executions == 3 and live.bytes_per_finished_execution is None
    assert live.bytes_per_live_execution is not None and live.bytes_per_live_execution > 400

    await start_worker(catalog)
    for execution_id in waiting:
        await settled(queue, execution_id)
    finished = await measure(queue)

    assert finished.executions == 3 and finished.bytes_per_live_execution is None
    assert finished.bytes_per_finished_execution is not None
    hashes = [await queue.redis.memory_usage(queue.keys.execution(execution_id)) for execution_id in waiting]
    assert sum(hashes) / 3 < finished.bytes_per_finished_execution < 500  # compact: the trigger is gone
    assert finished.executions_per_second > 0
    assert "finished" in lines(finished)[1] and "3 kept" in lines(finished)[1]
