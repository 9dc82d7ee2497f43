"""A node that blocks the event loop: the stall is logged with the node and counted; nothing runs twice."""

from __future__ import annotations

import aiohttp
from support import daemon_env, enqueue, settled, write_flow

from flowchat.redis_server import free_port


async def test_a_blocked_loop_is_reported_with_its_node_and_its_entry_is_not_run_again(
    queue, redis_url, flows_dir, catalog_factory, processes, tmp_path
):
    marks = tmp_path / "marks"
    # longer than the visibility timeout (1.5 s): the worker must not take over its own entry
    write_flow(flows_dir, "hog", [{"id": "hog", "type": "test.block", "with": {"file": str(marks), "seconds": 2.5}}])
    catalog = catalog_factory(flows_dir)
    port = free_port()
    env = daemon_env(redis_url, FLOWCHAT_STALL_THRESHOLD="0.5")
    serve = processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=env)
    execution_id = await enqueue(queue, catalog, "hog")

    assert (await settled(queue, execution_id))["status"] == "succeeded"
    assert marks.read_text().count(f"{execution_id} hog start") == 1
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    [stalls] = [line for line in text.splitlines() if line.startswith("flowchat_event_loop_stalls_total")]
    assert float(stalls.split()[-1]) >= 1
    assert f"held by execution {execution_id} node hog (test.block)" in processes.log_of(serve)
