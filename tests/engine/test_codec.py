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
