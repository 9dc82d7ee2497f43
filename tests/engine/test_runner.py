"""The runner: DAG order, concurrency, skips, retries, timeouts, the trace and its seams."""

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import write_flow

import flowchat

MakeFlow = Callable[..., flowchat.Flow]


@pytest.fixture
def make_flow(tmp_path: Path) -> MakeFlow:
    """Load a flow made of the given ``nodes:`` YAML, with the given node classes registered."""

    def make(nodes: str, *classes: type[flowchat.Node]) -> flowchat.Flow:
        registry = flowchat.Registry()
        for cls in classes:
            registry.add(flowchat.register(cls), "test")
        return flowchat.load_flow(write_flow(tmp_path, "test", nodes), registry)

    return make


async def run(flow: flowchat.Flow, trigger: dict | None = None, **runner_options) -> flowchat.Execution:
    return await flowchat.Runner(**runner_options).run(flow, flowchat.Execution.new(flow, trigger or {}))


def sleep_node(events: list[tuple[str, str, float]]) -> type[flowchat.Node]:
    """A node that sleeps ``seconds`` and records when it started and ended."""

    class Sleep(flowchat.Node):
        type = "test.sleep"

        class Config(flowchat.NodeConfig):
            seconds: float = 0.0

        async def run(self, ctx: flowchat.NodeContext, config: Config) -> dict:
            events.append(("start", ctx.node_id, time.perf_counter()))
            await asyncio.sleep(config.seconds)
            events.append(("end", ctx.node_id, time.perf_counter()))
            return {"slept": config.seconds}

    return Sleep


def at(events: list[tuple[str, str, float]], kind: str, node_id: str) -> float:
    return next(stamp for event, node, stamp in events if event == kind and node == node_id)


# --- order and concurrency ---------------------------------------------------------


async def test_needs_are_honoured_in_a_diamond(make_flow):
    events: list[tuple[str, str, float]] = []
    flow = make_flow(
        """
        - {id: d, type: test.sleep, needs: [b, c]}
        - {id: b, type: test.sleep, needs: [a], with: {seconds: 0.03}}
        - {id: c, type: test.sleep, needs: [a], with: {seconds: 0.01}}
        - {id: a, type: test.sleep, needs: [], with: {seconds: 0.01}}
        """,
        sleep_node(events),
    )

    execution = await run(flow)

    assert execution.status == "succeeded"
    assert at(events, "start", "b") >= at(events, "end", "a")
    assert at(events, "start", "c") >= at(events, "end", "a")
    assert at(events, "start", "d") >= max(at(events, "end", "b"), at(events, "end", "c"))
    assert [node for event, node, _ in events if event == "end"] == ["a", "c", "b", "d"]


async def test_a_node_without_needs_follows_the_node_above(make_flow):
    events: list[tuple[str, str, float]] = []
    flow = make_flow(
        """
        - {id: first, type: test.sleep, with: {seconds: 0.05}}
        - {id: second, type: test.sleep}
        - {id: third, type: test.sleep}
        """,
        sleep_node(events),
    )

    await run(flow)

    # run concurrently, the instant `second` would have finished before the slow `first`
    assert [(event, node) for event, node, _ in events] == [
        ("start", "first"),
        ("end", "first"),
        ("start", "second"),
        ("end", "second"),
        ("start", "third"),
        ("end", "third"),
    ]
    assert flow.nodes["second"].needs == ("first",)


class Prep(flowchat.Node):
    """A pure node (as ``set`` is)."""

    type = "test.prep"
    pure = True

    async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
        return {"x": 1}


async def test_what_a_pure_node_unblocks_starts_without_waiting_for_a_slow_sibling(make_flow):
    """Pure nodes run inline; the nodes they unblock start at once, beside a sibling still running."""
    events: list[tuple[str, str, float]] = []
    flow = make_flow(
        """
        - {id: slow, type: test.sleep, needs: [], with: {seconds: 0.5}}
        - {id: prep, type: test.prep, needs: []}
        - {id: notify, type: test.sleep, needs: [prep], with: {seconds: 0}}
        """,
        sleep_node(events),
        Prep,
    )

    execution = await run(flow)

    assert execution.status == "succeeded"
    assert at(events, "start", "notify") < at(events, "end", "slow")


async def test_what_a_pure_node_unblocks_runs_even_if_a_sibling_fails(make_flow):
    events: list[tuple[str, str, float]] = []
    flow = make_flow(
        """
        - {id: slow, type: test.sleep, needs: [], timeout: 0.2s, retry: {max_attempts: 1}, with: {seconds: 2}}
        - {id: prep, type: test.prep, needs: []}
        - {id: notify, type: test.sleep, needs: [prep], with: {seconds: 0}}
        """,
        sleep_node(events),
        Prep,
    )

    execution = await run(flow)

    assert execution.nodes["slow"].status == "failed"
    assert execution.nodes["notify"].status == "ok"


async def test_independent_roots_run_concurrently(make_flow):
    events: list[tuple[str, str, float]] = []
    flow = make_flow(
        """
        - {id: left, type: test.sleep, needs: [], with: {seconds: 0.2}}
        - {id: right, type: test.sleep, needs: [], with: {seconds: 0.2}}
        """,
        sleep_node(events),
    )

    started = time.perf_counter()
    execution = await run(flow)
    elapsed = time.perf_counter() - started

    assert execution.status == "succeeded"
    assert elapsed < 0.35
    assert max(at(events, "start", "left"), at(events, "start", "right")) < min(
        at(events, "end", "left"), at(events, "end", "right")
    )


# --- when and skips -----------------------------------------------------------------


async def test_when_false_skips_the_node_and_nodes_needing_only_skipped_ones(make_flow):
    ran: list[str] = []

    class Mark(flowchat.Node):
        type = "test.mark"

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            ran.append(ctx.node_id)
            return {"id": ctx.node_id}

    flow = make_flow(
        """
        - {id: start, type: test.mark}
        - {id: vip, type: test.mark, needs: [start], when: "{{ trigger.tier == 'vip' }}"}
        - {id: vip_followup, type: test.mark, needs: [vip]}
        - {id: vip_deeper, type: test.mark, needs: [vip_followup]}
        - {id: wrap_up, type: test.mark, needs: [vip, start]}
        """,
        Mark,
    )

    regular = await run(flow, {"tier": "basic"})
    ran_regular, ran[:] = list(ran), []
    vip = await run(flow, {"tier": "vip"})

    assert regular.status == "succeeded"
    assert {node_id: node.status for node_id, node in regular.nodes.items()} == {
        "start": "ok",
        "vip": "skipped",
        "vip_followup": "skipped",
        "vip_deeper": "skipped",
        "wrap_up": "ok",
    }
    assert regular.nodes["vip"].attempts == 0
    assert ran_regular == ["start", "wrap_up"]
    assert all(node.status == "ok" for node in vip.nodes.values())
    assert sorted(ran) == sorted(vip.nodes)


async def test_a_literal_false_when_skips_the_node(make_flow):
    class Mark(flowchat.Node):
        type = "test.mark"

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            return {}

    flow = make_flow("- {id: muted, type: test.mark, when: false}\n- {id: loud, type: test.mark, needs: []}", Mark)

    execution = await run(flow)

    assert execution.nodes["muted"].status == "skipped"
    assert execution.nodes["loud"].status == "ok"


async def test_skips_propagate_whatever_the_declaration_order(make_flow):
    class Mark(flowchat.Node):
        type = "test.mark"

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            return {}

    flow = make_flow(
        """
        - {id: last, type: test.mark, needs: [middle]}
        - {id: middle, type: test.mark, needs: [gate]}
        - {id: gate, type: test.mark, needs: [], when: false}
        """,
        Mark,
    )

    execution = await run(flow)

    assert {node_id: node.status for node_id, node in execution.nodes.items()} == {
        "last": "skipped",
        "middle": "skipped",
        "gate": "skipped",
    }
    assert execution.status == "succeeded"


# --- retries ------------------------------------------------------------------------


def flaky_node(stamps: list[float]) -> type[flowchat.Node]:
    """Fails with a retryable error until attempt ``succeed_on`` (0: never)."""

    class Flaky(flowchat.Node):
        type = "test.flaky"

        class Config(flowchat.NodeConfig):
            succeed_on: int = 0
            retry_after: float | None = None

        async def run(self, ctx: flowchat.NodeContext, config: Config) -> dict:
            stamps.append(time.perf_counter())
            if config.succeed_on and ctx.attempt >= config.succeed_on:
                return {"attempt": ctx.attempt}
            raise flowchat.RetryableError("upstream busy", code="upstream-busy", retry_after=config.retry_after)

    return Flaky


async def test_a_retryable_error_is_retried_with_exponential_backoff(make_flow):
    stamps: list[float] = []
    flow = make_flow(
        """
        - id: call
          type: test.flaky
          retry: {max_attempts: 4, backoff: 20ms}
          with: {succeed_on: 4}
        """,
        flaky_node(stamps),
    )

    execution = await run(flow)

    assert execution.status == "succeeded"
    assert execution.nodes["call"].attempts == 4
    assert execution.nodes["call"].output == {"attempt": 4}
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    # equal jitter: the wait after attempt n is between half and all of backoff * 2**(n-1)
    minimums = [0.010, 0.020, 0.040]
    assert all(gap >= minimum - 0.002 for gap, minimum in zip(gaps, minimums, strict=True))
    assert stamps[-1] - stamps[0] >= sum(minimums) - 0.002


def test_retry_delays_double_with_jitter_up_to_max_backoff():
    policy = flowchat.RetryPolicy(max_attempts=10, backoff="1s", max_backoff="8s")

    for attempt, ceiling in enumerate([1, 2, 4, 8, 8, 8], start=1):
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    assert policy.delay(1, retry_after=6) == 6  # Retry-After is honoured…
    assert policy.delay(1, retry_after=30) == 8  # …up to max_backoff: a server cannot park an execution for days


async def test_exhausting_the_attempts_fails_the_execution(make_flow):
    stamps: list[float] = []
    flow = make_flow(
        """
        - id: call
          type: test.flaky
          retry: {max_attempts: 3, backoff: 1ms}
        - {id: after, type: test.flaky}
        """,
        flaky_node(stamps),
    )

    execution = await run(flow)

    assert execution.status == "failed"
    assert len(stamps) == execution.nodes["call"].attempts == 3
    assert execution.error["node"] == "call"
    assert execution.error["code"] == "upstream-busy"
    assert execution.error["retryable"] is True
    assert execution.nodes["after"].status == "pending"


async def test_a_non_retryable_node_error_is_not_retried(make_flow):
    calls = 0

    class Reject(flowchat.Node):
        type = "test.reject"

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            nonlocal calls
            calls += 1
            raise flowchat.NodeError("contact opted out", code="opted-out")

    flow = make_flow("- {id: send, type: test.reject, retry: {max_attempts: 5, backoff: 1ms}}", Reject)

    execution = await run(flow)

    assert calls == execution.nodes["send"].attempts == 1
    assert execution.status == "failed"
    assert execution.error["code"] == "opted-out"


async def test_retry_after_is_waited_even_when_the_backoff_is_shorter(make_flow):
    stamps: list[float] = []
    flow = make_flow(
        """
        - id: call
          type: test.flaky
          retry: {max_attempts: 2, backoff: 1ms}
          with: {succeed_on: 2, retry_after: 0.15}
        """,
        flaky_node(stamps),
    )

    execution = await run(flow)

    assert execution.status == "succeeded"
    assert stamps[1] - stamps[0] >= 0.15


# --- timeouts, config and crashes ---------------------------------------------------


async def test_a_node_running_past_its_timeout_fails_with_node_timeout(make_flow):
    events: list[tuple[str, str, float]] = []
    flow = make_flow("- {id: slow, type: test.sleep, timeout: 50ms, with: {seconds: 5}}", sleep_node(events))

    started = time.perf_counter()
    execution = await run(flow)

    assert time.perf_counter() - started < 1
    assert execution.status == "failed"
    assert execution.error["code"] == "node-timeout"
    assert "timeout" in execution.error["message"]
    assert execution.nodes["slow"].attempts == 1


async def test_a_node_types_own_timeout_applies_by_default(make_flow):
    class Hang(flowchat.Node):
        type = "test.hang"
        timeout = 0.05

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            await asyncio.sleep(5)
            return {}

    execution = await run(make_flow("- {id: hang, type: test.hang}", Hang))

    assert execution.error["code"] == "node-timeout"


async def test_a_timeout_error_raised_by_the_node_itself_keeps_its_message(make_flow):
    class Locked(flowchat.Node):
        type = "test.locked"

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            raise TimeoutError("CRM lock wait timed out")

    execution = await run(make_flow("- {id: n, type: test.locked}", Locked))

    assert execution.status == "failed"
    assert "CRM lock wait timed out" in execution.error["message"]


async def test_a_rendered_config_that_does_not_fit_fails_with_node_config_invalid(make_flow):
    class Count(flowchat.Node):
        type = "test.count"

        class Config(flowchat.NodeConfig):
            count: int

        async def run(self, ctx: flowchat.NodeContext, config: Config) -> dict:
            return {"count": config.count}

    flow = make_flow(
        '- {id: n, type: test.count, retry: {max_attempts: 3, backoff: 1ms}, with: {count: "{{ trigger.count }}"}}',
        Count,
    )

    good = await run(flow, {"count": 3})
    bad = await run(flow, {"count": "many"})

    assert good.nodes["n"].output == {"count": 3}
    assert bad.status == "failed"
    assert bad.error["code"] == "node-config-invalid"
    assert "count" in bad.error["message"]
    assert bad.nodes["n"].attempts == 1


async def test_a_plain_exception_becomes_node_crashed(make_flow):
    class Buggy(flowchat.Node):
        type = "test.buggy"

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            raise ZeroDivisionError("division by zero")

    flow = make_flow("- {id: bug, type: test.buggy, retry: {max_attempts: 3, backoff: 1ms}}", Buggy)

    execution = await run(flow)

    assert execution.status == "failed"
    assert execution.error["code"] == "node-crashed"
    assert execution.error["message"] == "ZeroDivisionError: division by zero"
    assert execution.error["retryable"] is False
    assert execution.nodes["bug"].attempts == 1


async def test_run_must_return_a_dict_and_none_means_empty_output(make_flow):
    class Shape(flowchat.Node):
        type = "test.shape"

        class Config(flowchat.NodeConfig):
            kind: str

        async def run(self, ctx: flowchat.NodeContext, config: Config) -> dict:
            return {"list": [1, 2], "none": None}[config.kind]  # type: ignore[return-value]

    empty = await run(make_flow("- {id: n, type: test.shape, with: {kind: none}}", Shape))
    wrong = await run(make_flow("- {id: n, type: test.shape, with: {kind: list}}", Shape))

    assert (empty.status, empty.nodes["n"].output) == ("succeeded", {})
    assert wrong.status == "failed"
    assert wrong.error["code"] == "node-output-invalid"
    assert "list" in wrong.error["message"]


# --- the trace ----------------------------------------------------------------------


async def test_the_trace_has_status_attempts_duration_output_and_error_per_node(make_flow):
    class Step(flowchat.Node):
        type = "test.step"

        class Config(flowchat.NodeConfig):
            fail: bool = False

        async def run(self, ctx: flowchat.NodeContext, config: Config) -> dict:
            await asyncio.sleep(0.02)
            if config.fail:
                raise flowchat.NodeError("CRM said no", code="crm-rejected")
            return {"greeting": f"hi {ctx.trigger['name']}"}

    flow = make_flow(
        """
        - {id: greet, type: test.step}
        - {id: store, type: test.step, with: {fail: true}}
        - {id: notify, type: test.step}
        """,
        Step,
    )

    execution = await run(flow, {"name": "Ann"})

    greet, store, notify = (execution.nodes[node_id] for node_id in ("greet", "store", "notify"))
    assert (greet.status, greet.attempts, greet.output, greet.error) == ("ok", 1, {"greeting": "hi Ann"}, None)
    assert greet.duration_ms >= 15
    assert (store.status, store.attempts, store.output) == ("failed", 1, None)
    assert store.duration_ms >= 15
    assert store.error["code"] == "crm-rejected"
    assert store.error["message"] == "CRM said no"
    assert store.error["location"] == {"flow": "test", "execution": execution.id, "node": "store", "attempt": 1}
    assert (notify.status, notify.attempts, notify.output, notify.error) == ("pending", 0, None, None)
    assert execution.status == "failed"
    assert execution.error["node"] == "store"
    assert execution.finished_at is not None
    assert json.loads(json.dumps(execution.to_dict()))["nodes"]["greet"]["output"] == {"greeting": "hi Ann"}


async def test_a_failure_stops_downstream_nodes_but_not_running_siblings(make_flow):
    events: list[tuple[str, str, float]] = []

    class Boom(flowchat.Node):
        type = "test.boom"

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            raise flowchat.NodeError("boom", code="boom")

    flow = make_flow(
        """
        - {id: sibling, type: test.sleep, needs: [], with: {seconds: 0.05}}
        - {id: broken, type: test.boom, needs: []}
        - {id: child, type: test.sleep, needs: [broken]}
        - {id: grandchild, type: test.sleep, needs: [child]}
        """,
        sleep_node(events),
        Boom,
    )

    execution = await run(flow)

    assert execution.status == "failed"
    assert execution.error["node"] == "broken"
    assert execution.error["code"] == "boom"
    assert execution.nodes["sibling"].status == "ok"
    assert execution.nodes["child"].status == "pending"
    assert execution.nodes["grandchild"].status == "pending"
    assert {node for _, node, _ in events} == {"sibling"}


# --- seams for the durable queue ----------------------------------------------------


async def test_checkpoint_is_awaited_once_per_settled_node_with_its_final_status(make_flow):
    class Step(flowchat.Node):
        type = "test.step"

        class Config(flowchat.NodeConfig):
            fail: bool = False

        async def run(self, ctx: flowchat.NodeContext, config: Config) -> dict:
            if config.fail:
                raise flowchat.NodeError("no")
            return {}

    flow = make_flow(
        """
        - {id: a, type: test.step, with: {fail: "{{ trigger.fail }}"}}
        - {id: gated, type: test.step, needs: [a], when: "{{ trigger.go }}"}
        - {id: after_gate, type: test.step, needs: [gated]}
        - {id: b, type: test.step, needs: [a]}
        """,
        Step,
    )
    seen: list[tuple[str, str]] = []

    async def checkpoint(execution: flowchat.Execution, node_run: flowchat.NodeRun, node: object) -> None:
        await asyncio.sleep(0)
        seen.append((node_run.id, node_run.status))
        assert execution.nodes[node_run.id] is node_run

    await run(flow, {"go": False, "fail": False}, checkpoint=checkpoint)
    succeeded, seen[:] = list(seen), []
    await run(flow, {"go": True, "fail": True}, checkpoint=checkpoint)

    assert sorted(succeeded) == [("a", "ok"), ("after_gate", "skipped"), ("b", "ok"), ("gated", "skipped")]
    assert succeeded[0] == ("a", "ok")
    # the others never settle (they stay pending behind the failure), so they are never checkpointed
    assert seen == [("a", "failed")]


async def test_a_resumed_execution_does_not_rerun_finished_nodes(make_flow):
    calls: list[str] = []

    class Count(flowchat.Node):
        type = "test.count"

        class Config(flowchat.NodeConfig):
            value: int = 1

        async def run(self, ctx: flowchat.NodeContext, config: Config) -> dict:
            calls.append(ctx.node_id)
            return {"value": config.value}

    flow = make_flow(
        """
        - {id: first, type: test.count, with: {value: 1}}
        - {id: second, type: test.count, with: {value: "{{ first.value + 1 }}"}}
        """,
        Count,
    )
    saved = flowchat.Execution.new(flow, {})
    saved.nodes["first"].status, saved.nodes["first"].output, saved.nodes["first"].attempts = "ok", {"value": 41}, 1
    resumed = flowchat.Execution.from_dict(json.loads(json.dumps(saved.to_dict())))

    execution = await flowchat.Runner().run(flow, resumed)

    assert calls == ["second"]
    assert execution.status == "succeeded"
    assert execution.nodes["first"].attempts == 1
    assert execution.nodes["second"].output == {"value": 42}


async def test_defer_waits_returns_waiting_with_wake_at_instead_of_sleeping(make_flow):
    stamps: list[float] = []
    flow = make_flow(
        """
        - id: call
          type: test.flaky
          retry: {max_attempts: 3, backoff: 60s}
          with: {succeed_on: 2}
        - {id: after, type: test.flaky, with: {succeed_on: 1}}
        """,
        flaky_node(stamps),
    )
    now = [1_000_000.0]
    services = flowchat.Services(clock=lambda: now[0])
    runner = flowchat.Runner(services, defer_waits=True)
    execution = flowchat.Execution.new(flow, {})

    started = time.perf_counter()
    await runner.run(flow, execution)

    assert time.perf_counter() - started < 1
    assert execution.status == "waiting"
    assert execution.nodes["call"].status == "waiting"
    assert execution.nodes["call"].error["code"] == "upstream-busy"
    assert 1_000_030.0 <= execution.wake_at <= 1_000_060.0
    assert execution.nodes["after"].status == "pending"

    await runner.run(flow, execution)  # woken too early: nothing runs
    assert len(stamps) == 1
    assert execution.status == "waiting"

    now[0] = execution.wake_at
    await runner.run(flow, execution)
    assert execution.status == "succeeded"
    assert execution.nodes["call"].attempts == 2
    assert execution.nodes["call"].error is None
    assert execution.wake_at is None
    assert len(stamps) == 3


async def test_rendering_the_config_and_when_count_inside_the_node_timeout(make_flow):
    class Quick(flowchat.Node):
        type = "test.quick"

        class Config(flowchat.NodeConfig):
            n: int = 0

        async def run(self, ctx: flowchat.NodeContext, config: Config) -> dict:
            return {}

    slow = "{{ range(90000) | map('string') | join | length }}"
    flow = make_flow(
        f"""
        - {{id: gated, type: test.quick, timeout: 1ms, when: "{slow} > 0", needs: []}}
        - {{id: rendered, type: test.quick, timeout: 1ms, retry: {{max_attempts: 1}}, with: {{n: "{slow}"}}, needs: []}}
        """,
        Quick,
    )
    execution = await run(flow)

    for node_id, doing in (("gated", "evaluating its `when`"), ("rendered", "rendering its config")):
        error = execution.nodes[node_id].error
        assert error is not None and error["code"] == "node-timeout", node_id
        assert doing in error["message"]
