"""Fuzzing with hypothesis: random flow files load to a Flow or problem reports; random requests get no 5xx.

Bounded for CI (``FLOWCHAT_FUZZ_EXAMPLES``, default 150 per test). A soak run::

    FLOWCHAT_FUZZ_EXAMPLES=20000 python -m pytest tests/engine/test_fuzz.py -q
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis
from support import ROOT, daemon_env

from flowchat import FlowInvalid, Registry, load_registry
from flowchat.keys import Keys
from flowchat.loader import load_flow_text
from flowchat.redis_server import free_port

EXAMPLES = int(os.environ.get("FLOWCHAT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # shared CI machines are slow; the loader's own limits keep each example bounded
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=EXAMPLES <= 150,  # CI runs the same examples every time; a soak run explores
)
SHIPPED = sorted([*ROOT.joinpath("flows").glob("*.yaml"), *ROOT.joinpath("examples").glob("*.yaml")])

YAML_PIECES = [
    "flow: ", "trigger: ", "nodes:", "\n", "  ", "- ", ": ", "{", "}", "[", "]", ",", "&a ", "*a", "!!python/name:os.system ",
    "!!int ", "!!binary ", "!foo ", "? ", "|", ">", "'", '"', "#", "---\n", "...\n", "{{ ", " }}", "{% ", " %}", "x",
    "id: ", "type: ", "set", "log", "with: ", "needs: ", "when: ", "trigger.x", " | upper", " | nope", " ** ", " * ",
    "10", "1000000000", "vars.", "schema_file: ", "../", "/dev/zero", "\t", "\x00", "é", "\ud7ff", "<<: ", "null", "~",
]  # fmt: skip


@pytest.fixture(scope="module")
def full_registry() -> Registry:
    return load_registry(ROOT / "plugins")


def load_or_report(text: str, registry: Registry) -> None:
    try:
        load_flow_text(text, "fuzz.yaml", registry)
    except FlowInvalid as invalid:
        assert invalid.errors and all(error.code for error in invalid.errors)


@FUZZ
@given(st.lists(st.sampled_from(YAML_PIECES), max_size=60).map("".join))
def test_random_yaml_loads_or_is_reported(full_registry: Registry, text: str) -> None:
    load_or_report(text, full_registry)


@FUZZ
@given(
    st.sampled_from(SHIPPED),
    st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 40), st.sampled_from(["", *YAML_PIECES])),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_shipped_flows_load_or_are_reported(
    full_registry: Registry, path: Path, edits: list[tuple[float, int, str]]
) -> None:
    text = path.read_text(encoding="utf-8")
    for where, cut, insert in edits:
        at = int(where * len(text))
        text = text[:at] + insert + text[at + cut :]
    load_or_report(text, full_registry)


# --- ingress --------------------------------------------------------------------------------

HEADER_NAMES = [
    b"Content-Type", b"Idempotency-Key", b"Authorization", b"X-FlowChat-Signature", b"X-Twilio-Signature",
    b"Content-Encoding", b"Transfer-Encoding", b"X-Anything",
]  # fmt: skip
CONTENT_TYPES = [
    b"application/json", b"application/x-www-form-urlencoded", b"text/plain", b"", b"application/vnd.api+json",
    b"multipart/form-data; boundary=x", b"application/json; charset=latin-1",
]  # fmt: skip
header_value = st.binary(max_size=80).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps({"v": value}, allow_nan=True).encode()),
    st.sampled_from([b'{"n": 18446744073709551616}', b'{"s": "\\ud800"}', b'{"n": NaN}', b"a=1&a=2", b"[" * 5000]),
)


@pytest.fixture
def fuzz_daemon(redis_url: str, tmp_path: Path, processes) -> tuple[int, Redis]:
    flows = tmp_path / "fuzz-flows"
    flows.mkdir()
    flow = "flow: {name}\ntrigger: {{type: webhook{extra}}}\nnodes:\n  - {{id: a, type: test.noop}}\n"
    (flows / "open.yaml").write_text(flow.format(name="open", extra=""))
    (flows / "signed.yaml").write_text(flow.format(name="signed", extra=", secret_env: FUZZ_SECRET"))
    (flows / "schema.yaml").write_text(
        flow.format(name="schema", extra=", schema: {type: object, required: [n], properties: {n: {type: integer}}}")
    )
    port = free_port()
    env = daemon_env(redis_url, FUZZ_SECRET="fuzz-secret")
    processes.start("serve", "--flows", str(flows), "--port", str(port), "--no-workers", env=env)
    return port, Redis.from_url(redis_url)


async def send(port: int, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        writer.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1])
    finally:
        writer.close()


@FUZZ
@given(
    path=st.sampled_from(
        [b"/hooks/open", b"/hooks/signed", b"/hooks/schema", b"/hooks/nope", b"/twilio/message", b"/twilio/status"]
    ),
    headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_value), max_size=4),
    content_type=st.sampled_from(CONTENT_TYPES),
    body=bodies,
)
def test_random_requests_never_get_a_5xx_and_rejected_ones_store_nothing(
    fuzz_daemon: tuple[int, Redis], path: bytes, headers: list[tuple[bytes, bytes]], content_type: bytes, body: bytes
) -> None:
    port, redis = fuzz_daemon
    before = redis.xlen(Keys("fc").ready)  # no workers: every accepted execution is still on it
    status = asyncio.run(send(port, path, [(b"Content-Type", content_type), *headers], body))
    assert status < 500
    if status >= 300:
        assert redis.xlen(Keys("fc").ready) == before
