"""flowchat.testing: run one node or one flow as a worker does, on a fake clock."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest

import flowchat
from flowchat import Node, NodeConfig, NodeContext, RetryableError, RetryPolicy
from flowchat.testing import FakeClock, NodeFailed, run_flow, run_node


class Flaky(Node):
    """Fails retryably until its third attempt (not registered: tests may pass a class)."""

    type = "test.harness_flaky"
    retry = RetryPolicy(max_attempts=3, backoff=30.0, max_backoff=60.0)
    calls = 0

    async def run(self, ctx: NodeContext, config: NodeConfig) -> dict[str, Any]:
        Flaky.calls += 1
        if ctx.attempt < 3:
            raise RetryableError("not yet", code="flaky")
        return {"attempt": ctx.attempt}


class Awkward(Node):
    """Returns values a worker must convert before storing them."""

    type = "test.harness_awkward"

    class Config(NodeConfig):
        when: str

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        return {
            "at": datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC),
            "pair": (1, 2),
            "when": config.when,
            "crm": ctx.services.get("crm").name,
        }


class Crm:
    name = "fake-crm"


async def test_run_node_renders_validates_runs_and_round_trips_like_a_worker():
    output = await run_node(Awkward, {"when": "{{ trigger.day }}"}, trigger={"day": "monday"}, services={"crm": Crm()})

    assert output == {"at": "2024-05-01T00:00:00+00:00", "pair": [1, 2], "when": "monday", "crm": "fake-crm"}


async def test_run_node_takes_a_built_in_by_name():
    assert await run_node("set", {"values": {"n": "{{ trigger.n + 1 }}"}}, trigger={"n": 41}) == {"n": 42}


async def test_run_node_raises_the_node_error_with_its_code():
    with pytest.raises(NodeFailed) as caught:
        await run_node(Flaky, {})
    assert caught.value.code == "flaky" and caught.value.retryable is True


async def test_run_node_refuses_a_config_the_loader_would_refuse():
    with pytest.raises(flowchat.FlowInvalid) as caught:
        await run_node("set", {"valuez": {}})
    assert "unknown-key" in [error.code for error in caught.value.errors]


async def test_run_node_masks_secrets_in_the_output():
    output = await run_node("set", {"values": {"auth": "Bearer {{ secrets.TOKEN }}"}}, secrets={"TOKEN": "s3cr3t-v"})
    assert output == {"auth": "Bearer ***"}


async def test_a_node_that_needs_a_service_nobody_gave_is_refused():
    class NeedsCrm(Node):
        type = "test.harness_needs"
        services = ("crm_nowhere",)

        async def run(self, ctx: NodeContext, config: NodeConfig) -> dict[str, Any]:
            return {}

    with pytest.raises(flowchat.FlowInvalid) as caught:
        await run_node(NeedsCrm, {})
    assert [error.code for error in caught.value.errors] == ["service-missing"]


FLOW = """\
flow: reminder
trigger: {type: webhook}
nodes:
  - {id: wait, type: delay, with: {for: 2h}}
  - {id: flaky, type: test.harness_flaky}
  - {id: done, type: set, with: {values: {after: "{{ flaky.attempt }}"}}}
"""


async def test_run_flow_fast_forwards_delays_and_backoff_on_a_fake_clock():
    registry = flowchat.load_registry(entry_points=False)
    registry.types[Flaky.type], registry.sources[Flaky.type] = Flaky, "test"
    clock = FakeClock(start=1_700_000_000.0)
    started = time.monotonic()

    execution = await run_flow(FLOW, {"name": "Ana"}, registry=registry, clock=clock)

    assert time.monotonic() - started < 2
    assert execution.status == "succeeded", execution.error
    assert execution.nodes["flaky"].attempts == 3
    assert execution.nodes["done"].output == {"after": 3}
    assert clock.slept[0] == 7200.0 and len(clock.slept) == 3  # the delay, then two backoffs
    assert clock() >= 1_700_000_000.0 + 7200 + 2 * 15  # backoff is jittered from half of 30s


async def test_run_flow_reads_a_file(tmp_path):
    path = tmp_path / "hello.yaml"
    path.write_text("flow: hello\ntrigger: {type: webhook}\nnodes:\n  - {id: s, type: set, with: {values: {x: 1}}}\n")

    execution = await run_flow(path, {})
    same = await run_flow(str(path), {})

    assert execution.nodes["s"].output == same.nodes["s"].output == {"x": 1}


async def test_run_flow_gives_a_schedule_trigger_its_payload_tick_and_missed_from_the_clock() -> None:
    text = """flow: nightly
trigger: {type: schedule, cron: "0 3 * * *", payload: {report: daily}}
nodes:
  - {id: echo, type: set, with: {values: {tick: "{{ trigger.tick }}", missed: "{{ trigger.missed }}", report: "{{ trigger.report }}"}}}
"""
    at_three = datetime.datetime(2026, 11, 30, 3, 0, 42, tzinfo=datetime.UTC).timestamp()
    execution = await run_flow(text, clock=FakeClock(at_three))
    assert execution.nodes["echo"].output == {"tick": "2026-11-30T03:00:00+00:00", "missed": 0, "report": "daily"}


async def test_run_flow_checks_a_webhook_payload_against_the_trigger_schema() -> None:
    text = """flow: strict
trigger: {type: webhook, schema: {type: object, required: [phone]}}
nodes:
  - {id: a, type: set, with: {values: {}}}
"""
    with pytest.raises(ValueError, match="phone"):
        await run_flow(text, {"name": "no phone"})
