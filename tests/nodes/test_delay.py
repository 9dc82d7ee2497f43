"""``delay``: wait for a duration or until a time (on a fake clock here: the execution is parked, not slept on)."""

import pytest
from support import flow_yaml

import flowchat
from flowchat import testing
from flowchat.testing import FakeClock

START = 1_700_000_000.0  # 2023-11-14T22:13:20Z


async def run(builtin_registry: flowchat.Registry, nodes: str, clock: FakeClock) -> flowchat.Execution:
    return await testing.run_flow(flow_yaml("wait", nodes), {}, registry=builtin_registry, clock=clock)


async def test_for_waits_its_duration_and_says_until_when(builtin_registry):
    clock = FakeClock(start=START)

    execution = await run(builtin_registry, "- {id: wait, type: delay, with: {for: 10m}}", clock)

    assert execution.status == "succeeded", execution.error
    assert clock.slept == [600.0]
    assert execution.nodes["wait"].output == {"waited_until": "2023-11-14T22:23:20+00:00"}


async def test_until_a_time_waits_for_it_and_a_past_time_not_at_all(builtin_registry):
    later, past = FakeClock(start=START), FakeClock(start=START)

    waited = await run(builtin_registry, "- {id: wait, type: delay, with: {until: '2023-11-14T23:13:20'}}", later)
    passed = await run(builtin_registry, "- {id: wait, type: delay, with: {until: '2020-01-01T00:00:00Z'}}", past)

    assert (waited.status, later.slept) == ("succeeded", [3600.0])  # a naive time is UTC
    assert (passed.status, past.slept) == ("succeeded", [])


async def test_an_until_that_is_not_a_time_fails_the_node(builtin_registry):
    execution = await run(builtin_registry, "- {id: wait, type: delay, with: {until: 'next tuesday'}}", FakeClock())

    assert execution.status == "failed"
    assert execution.nodes["wait"].error["code"] == "delay-bad-time"


@pytest.mark.parametrize("config", [{}, {"for": "1s", "until": "2020-01-01T00:00:00Z"}])
def test_exactly_one_of_for_and_until(builtin_registry, write_flow, config):
    path = write_flow([{"id": "wait", "type": "delay", "with": config}])
    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, builtin_registry)
    assert "exactly one of for or until" in str(caught.value)
