"""The node-output boundary and the stored-state codec."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import uuid
from email.message import Message

import pytest
from multidict import CIMultiDict, istr

from flowchat.codec import (
    decode_hash,
    decode_summary,
    encode_compact,
    encode_meta,
    encode_state,
    execution_from_parts,
    node_output,
    run_fields,
)
from flowchat.errors import NodeError
from flowchat.execution import Execution, NodeRun


def invalid(output: object) -> NodeError:
    with pytest.raises(NodeError) as caught:
        node_output(output)
    assert caught.value.code == "node-output-invalid"
    assert caught.value.retryable is False
    return caught.value


def test_plain_output_passes_unchanged():
    output = {"a": 1, "b": [1, "x", None, True, 1.5], "c": {"d": "e"}}
    assert node_output(output) == output
    assert node_output(None) == {}


def test_keys_become_json_text_and_containers_become_lists():
    def numbers():
        yield from (1, 2)

    converted = node_output({1: "a", None: 0, 2.5: 1, "t": (1, 2), "s": {"b", "a"}, "g": numbers()})
    assert converted == {"1": "a", "null": 0, "2.5": 1, "t": [1, 2], "s": ["a", "b"], "g": [1, 2]}


def test_datetimes_are_iso_8601_and_other_scalars_their_documented_form():
    class Color(enum.Enum):
        RED = "red"

    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    converted = node_output(
        {
            "at": when,
            "day": when.date(),
            "wait": datetime.timedelta(minutes=2),
            "raw": b"hi",
            "id": uuid.UUID(int=1),
            "color": Color.RED,
            "point": Point(1, 2),
            "set": {when},
        }
    )
    assert converted["at"] == "2026-01-02T03:04:05+00:00"
    assert converted["day"] == "2026-01-02"
    assert converted["wait"] == 120.0
    assert converted["raw"] == "hi"
    assert converted["id"] == "00000000-0000-0000-0000-000000000001"
    assert converted["color"] == "red"
    assert converted["point"] == {"x": 1, "y": 2}
    assert converted["set"] == ["2026-01-02T03:04:05+00:00"]


def test_headers_have_lower_case_names_and_repeated_values_joined_except_set_cookie():
    headers = CIMultiDict([("Content-Type", "text/plain"), ("Vary", "a"), ("VARY", "b")])
    headers.add("Set-Cookie", "x=1")
    converted = node_output({"headers": headers, "plain": {istr("X-Id"): "7"}})
    assert converted["headers"] == {"content-type": "text/plain", "vary": "a, b", "set-cookie": ["x=1"]}
    assert converted["plain"] == {"x-id": "7"}
    message = Message()
    message["Content-Type"] = "text/html"
    message["Set-Cookie"] = "a=1"
    message["Set-Cookie"] = "b=2"
    assert node_output({"h": message})["h"] == {"content-type": "text/html", "set-cookie": ["a=1", "b=2"]}


def test_what_cannot_be_converted_names_the_key_path_and_the_type():
    class Opaque:
        pass

    error = invalid({"items": [{"ok": 1}, {"when": Opaque()}]})
    assert "output.items[1].when" in error.message
    assert "Opaque" in error.message
    assert "bytes that are not UTF-8" in invalid({"raw": b"\xff"}).message
    assert "64-bit" in invalid({"n": 2**70}).message
    assert "JSON object key" in invalid({(1, 2): "tuple key"}).message
    assert "two keys" in invalid({1: "a", "1": "b"}).message
    assert "must return a dict" in invalid([1, 2]).message
    deep: dict[str, object] = {}
    cursor = deep
    for _ in range(300):
        cursor["x"] = {}
        cursor = cursor["x"]  # type: ignore[assignment]
    assert "nested deeper" in invalid(deep).message


def test_masking_comes_before_the_size_limit():
    big = {"text": "x" * 2000}
    with pytest.raises(NodeError) as caught:
        node_output(big, max_bytes=1000)
    assert caught.value.code == "node-output-too-large"
    assert node_output(big, mask=lambda value: {"text": "***"}, max_bytes=1000) == {"text": "***"}


def test_stored_state_round_trips():
    execution = Execution("x1", "f", "v1", {"name": "Ana"}, {"a": NodeRun("a", "set"), "b": NodeRun("b", "log")})
    execution.nodes["a"].status, execution.nodes["a"].output = "ok", {"n": 1}
    fields = {"m": encode_meta(execution), "s": encode_state(execution), "d": "2"}
    values = run_fields([execution.nodes["a"]])
    fields.update(zip(values[::2], values[1::2], strict=True))
    stored = decode_hash(fields)
    assert stored is not None and stored.deliveries == 2
    again = execution_from_parts(stored.meta, stored.nodes, [("a", "set"), ("b", "log")])
    assert again.to_dict() == execution.to_dict()
    assert list(again.to_dict()) == [
        "id",
        "flow",
        "flow_version",
        "status",
        "trigger",
        "nodes",
        "created_at",
        "started_at",
        "finished_at",
        "error",
    ]
    assert decode_hash({"s": "{}"}) is None


def test_the_compact_form_keeps_the_summary_and_drops_outputs_and_a_large_trigger():
    nodes = {"a": NodeRun("a", "set"), "b": NodeRun("b", "log")}
    execution = Execution("x1", "f", "v1", {"name": "Ana"}, nodes, status="succeeded", created_at=1000.0)
    execution.started_at, execution.finished_at = 1000.0125, 1000.25
    nodes["a"].status, nodes["a"].attempts, nodes["a"].duration_ms, nodes["a"].output = "ok", 2, 3.14159, {"n": 1}
    nodes["b"].status = "skipped"
    values = encode_compact(execution)
    fields = dict(zip(values[::2], values[1::2], strict=True))
    assert fields == {
        "z": '["v1","succeeded",1000.0,13,250]',
        "f": "f",
        "t": '{"name":"Ana"}',
        "n:a": '["ok",2,3.1]',
        "n:b": '["skipped",0,0.0]',
    }
    assert all(len(value) <= 64 for value in fields.values())  # Redis keeps such a hash in its small encoding

    stored = decode_hash({**fields, "d": "1"}, "x1")
    assert stored is not None and stored.compact and stored.deliveries == 1
    again = execution_from_parts(stored.meta, stored.nodes, [("a", "set"), ("b", "log")]).to_dict()
    assert (again["id"], again["flow"], again["flow_version"], again["status"]) == ("x1", "f", "v1", "succeeded")
    assert (again["created_at"], again["started_at"], again["finished_at"], again["error"]) == (
        1000.0,
        1000.013,
        1000.25,
        None,
    )
    assert again["trigger"] == {"name": "Ana"}
    assert again["nodes"]["a"] == {
        **NodeRun("a", "set").__dict__,
        "status": "ok",
        "attempts": 2,
        "duration_ms": 3.1,
    }  # no output, no times: not kept
    assert decode_summary("x1", [None, None, fields["z"], b"f", None])["trigger"] is None

    execution.trigger = {"text": "x" * 100}
    assert "t" not in encode_compact(execution)[::2]
