"""flowchat.sandbox: work over a template limit is refused before it is done; payload keys read as keys."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from support import flow_yaml

from flowchat import Execution, Registry, Runner, load_registry
from flowchat.loader import load_flow_text

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(plugins=REPO / "plugins")


async def run(registry: Registry, node: dict[str, Any], trigger: dict[str, Any]) -> Execution:
    flow = load_flow_text(flow_yaml("t", [node]), "t.yaml", registry)
    return await Runner().run(flow, Execution.new(flow, trigger))


@pytest.mark.parametrize(
    ("expression", "trigger"),
    [
        ("{{ trigger.n ** trigger.m }}", {"n": 10, "m": 30_000_000}),
        ("{{ trigger.qty * trigger.price }}", {"qty": "a", "price": 20_000_000}),
        ("{{ trigger.list * trigger.n }}", {"list": [1, 2, 3], "n": 10_000_000}),
        (
            "{% for a in range(trigger.n) %}{% for b in range(trigger.n) %}x{% endfor %}{% endfor %}",
            {"n": 100_000},
        ),
        ("{{ lipsum(trigger.n) }}", {"n": 10_000_000}),
        ("{{ range(trigger.n) | list }}", {"n": 10**9}),
        ("{{ '%*d' % (trigger.n, 1) }}", {"n": 10**9}),
        ("{{ '{:{w}}'.format(1, w=trigger.n) }}", {"n": 10**9}),
        ("{{ trigger.s | center(trigger.n) }}", {"s": "x", "n": 10**9}),
        ("{{ trigger.parts | join(trigger.sep) }}", {"parts": ["a"] * 1000, "sep": "x" * 10_000}),
    ],
)
async def test_a_template_over_a_limit_fails_its_node_quickly(
    registry: Registry, expression: str, trigger: dict[str, Any]
) -> None:
    started = time.monotonic()
    execution = await run(registry, {"id": "s", "type": "set", "with": {"values": {"v": expression}}}, trigger)

    assert time.monotonic() - started < 3
    assert execution.status == "failed"
    assert execution.nodes["s"].error is not None
    assert execution.nodes["s"].error["code"] == "template-limit", execution.nodes["s"].error


async def test_a_number_rendered_into_a_string_field_becomes_its_string(registry: Registry) -> None:
    execution = await run(
        registry, {"id": "say", "type": "log", "with": {"message": "{{ trigger.score }}"}}, {"score": 42}
    )
    assert execution.status == "succeeded", execution.error


async def test_payload_keys_named_like_dict_methods_read_the_key(registry: Registry) -> None:
    execution = await run(
        registry,
        {"id": "s", "type": "set", "with": {"values": {"items": "{{ trigger.items }}", "keys": "{{ trigger.keys }}"}}},
        {"items": [1, 2], "keys": "k"},
    )
    assert execution.status == "succeeded", execution.error
    assert execution.nodes["s"].output == {"items": [1, 2], "keys": "k"}
