"""flowchat.warehouse: events as Parquet by day and the views over them; erasure, retention, compaction."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from analytics_data import ALICE, DAVE, append, count, known_data_set, loaded, physical_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from support import wait_for

from flowchat.sink import Sink
from flowchat.warehouse import Warehouse, entries_table, phone_hash


async def test_views_show_the_recorded_events(redis_url: str, start_sink: Callable[..., Sink], data_dir: Path) -> None:
    await loaded(redis_url, start_sink, data_dir)
    con = duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM node_runs").fetchone() == (26,)
        row = con.execute(
            "SELECT flow, flow_version, trigger_type, status, duration_ms, attempts, error_code, "
            "finished_at - started_at FROM executions WHERE execution_id = 'w3'"
        ).fetchone()
        assert row is not None and row[:7] == ("welcome", "v1", "webhook", "failed", 400, 1, "twilio-63016")
        assert row[7].total_seconds() == 0.4
        messages = dict(con.execute("SELECT sid, status FROM messages").fetchall())
        assert messages == {
            "SM1": "read",
            "SM2": "delivered",
            "SM3": "read",
            "SM4": "failed",
            "SM5": "undelivered",
            "SM6": "sent",
            "SMin1": "received",
        }  # SM7 went to Dave, who is erased
        sm3 = con.execute(
            "SELECT execution_id, flow, node, phone, delivered_at IS NULL, read_at > sent_at, sent_at > queued_at "
            "FROM messages WHERE sid = 'SM3'"
        ).fetchone()
        assert sm3 == ("w3", "welcome", "send", "+14155550103", True, True, True)
        assert con.execute("SELECT error_code FROM messages WHERE sid = 'SM4'").fetchone() == ("twilio-30008",)
        assert con.execute("SELECT sum(value), tags['campaign'] FROM metrics GROUP BY 2 ORDER BY 2").fetchall() == [
            (4.0, "fall"),
            (12.5, "spring"),
        ]
        actions = con.execute("SELECT action, phone, tags FROM contact_events ORDER BY ts").fetchall()
        assert actions[0] == ("tagged", ALICE, ["vip", "spring"])
        assert [a for a, _, _ in actions] == ["tagged", "tagged", "opted_out", "opted_in"]
        assert con.execute("SELECT count(*) FROM contact_events WHERE phone = ?", [DAVE]).fetchone() == (0,)
    finally:
        con.close()


async def test_erasure_hides_the_phone_at_once_and_compaction_removes_it(
    redis_url: str, start_sink: Callable[..., Sink], data_dir: Path
) -> None:
    await loaded(redis_url, start_sink, data_dir)
    warehouse = Warehouse(data_dir)
    tomb = warehouse.tombstones()
    assert [t.phone_hash for t in tomb] == [phone_hash(DAVE)] and not tomb[0].purged
    assert DAVE not in (data_dir / "analytics" / "tombstones.json").read_text()
    # hidden in every view that shows phones, still in the Parquet files until compaction
    assert count(data_dir, f"SELECT count(*) FROM messages WHERE phone = '{DAVE}'") == 0
    assert count(data_dir, f"SELECT count(*) FROM contact_events WHERE phone = '{DAVE}'") == 0
    raw = f"SELECT count(*) FROM events WHERE phone = '{DAVE}'"
    assert count(data_dir, raw) == 0
    assert physical_rows(data_dir) == len(known_data_set())
    assert warehouse.compact() >= 1
    assert physical_rows(data_dir) == len(known_data_set()) - 4  # created, two message events, erased
    assert warehouse.tombstones()[0].purged
    assert count(data_dir, "SELECT count(*) FROM messages") == 7
    # a contact who comes back after erasure is recorded again
    from analytics_data import Recorder

    later = Recorder(hours_ago=0)
    later.add("contact", {"action": "created", "phone": DAVE})
    append(redis_url, later.events)
    await wait_for(lambda: count(data_dir, f"SELECT count(*) FROM contact_events WHERE phone = '{DAVE}'") == 1)
    warehouse.close()


def test_retention_removes_old_days(tmp_path: Path) -> None:
    from flowchat.warehouse import event_row

    warehouse = Warehouse(tmp_path)
    now = int(time.time() * 1000)
    rows = [
        event_row({"id": f"e{d}", "type": "metric", "ts": str(now - d * 86_400_000), "data": '{"name":"x","value":1}'})
        for d in (0, 2, 5, 9)
    ]
    warehouse.write(rows, "1-0")
    assert len(warehouse.files()) == 4
    assert warehouse.expire(0, now) == 0
    assert warehouse.expire(3, now) == 2
    assert count(tmp_path, "SELECT count(*) FROM metrics") == 2
    warehouse.close()


def test_compaction_merges_small_files_once_per_event(tmp_path: Path) -> None:
    from flowchat.warehouse import event_row

    warehouse = Warehouse(tmp_path)
    now = int(time.time() * 1000)
    for batch in range(6):
        rows = [
            event_row({"id": f"e{batch}-{i}", "type": "metric", "ts": str(now + i), "data": '{"name":"x","value":1}'})
            for i in range(100)
        ]
        warehouse.write(rows, f"{batch}-0")
    warehouse.write(rows, "5-0-again")  # a batch written twice
    assert len(warehouse.files()) == 7 and physical_rows(tmp_path) == 700
    assert count(tmp_path, "SELECT count(*) FROM metrics") == 600
    assert warehouse.compact(min_files=4) == 7
    assert len(warehouse.files()) == 1 and physical_rows(tmp_path) == 600
    assert warehouse.compact(min_files=4) == 0
    warehouse.close()


def test_entries_table_takes_any_field_order_and_odd_values() -> None:
    ordered = [b"id", b"a", b"type", b"metric", b"ts", b"5", b"flow", b"f", b"execution_id", b"x", b"node", b"n"]
    table = entries_table(
        [
            [*ordered, b"data", b'{"name": "m", "value": 1}'],
            [b"type", b"contact", b"id", b"b", b"data", b'{"action": "created", "phone": "+14155550100"}'],
            [b"id", b"c", b"type", b"message", b"ts", b"soon", b"data", b"not json"],
            [b"id", b"\xff\xfe", b"type", b"node_run", b"ts", b"7"],
        ]
    )
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c", "\ufffd\ufffd"]
    assert [r["ts"] for r in rows] == [5, 0, 0, 7]
    assert rows[1]["phone"] == "+14155550100" and rows[1]["flow"] == "" and rows[2]["phone"] is None
    assert rows[3]["data"] == "{}"


def test_node_runs_carried_by_execution_and_node_runs_entries_become_node_run_rows() -> None:
    def fields(kind: str, data: dict[str, Any]) -> list[bytes]:
        names = (b"id", b"type", b"ts", b"flow", b"execution_id", b"node", b"data")
        values = (b"", kind.encode(), b"9", b"crm", b"x1", b"", json.dumps(data).encode())
        return [item for pair in zip(names, values, strict=True) for item in pair]

    run = {"node_type": "set", "status": "ok", "attempt": 1, "started_at": 8, "duration_ms": 0.5, "error_code": ""}
    entries = [
        fields("node_runs", {"runs": [{**run, "node": "a"}, {**run, "node": "b"}]}),
        fields("execution", {"status": "succeeded", "runs": [{**run, "node": "c"}]}),
    ]
    first = entries_table(entries, [b"1-0", b"2-0"]).to_pylist()
    again = entries_table(entries, [b"1-0", b"2-0"]).to_pylist()  # the same entries read again: the same rows
    assert first == again
    assert [(r["type"], r["node"], r["id"]) for r in first] == [
        ("node_run", "a", "stream-1-0:0"),
        ("node_run", "b", "stream-1-0:1"),
        ("execution", "", "stream-2-0"),
        ("node_run", "c", "stream-2-0:0"),
    ]
    assert json.loads(first[2]["data"]) == {"status": "succeeded"}  # the runs are not kept twice
    assert json.loads(first[0]["data"]) == {k: v for k, v in run.items()}


def test_a_metric_node_run_again_after_a_crash_counts_once(tmp_path: Path) -> None:
    """`metric` is idempotent: the view keeps one of the same metric per (execution, node), the first."""
    from flowchat.warehouse import event_row

    warehouse = Warehouse(tmp_path)
    now = int(time.time() * 1000)

    def metric(event_id: str, execution: str, node: str, value: int, ts: int) -> dict[str, Any]:
        data = json.dumps({"name": "crm.inbound", "value": value})
        fields = {"id": event_id, "type": "metric", "ts": str(ts), "data": data}
        return event_row(fields | ({"execution_id": execution, "node": node} if execution else {}))

    rows = [
        metric("e1", "x1", "count", 1, now),
        metric("e2", "x1", "count", 1, now + 5),  # the same node, run again after its worker died
        metric("e3", "x1", "other", 2, now + 6),
        metric("e7", "x1", "other", 3, now + 6),  # another metric of the same node: kept
        metric("e4", "x2", "count", 1, now + 7),
        metric("e5", "", "", 10, now + 8),  # metrics recorded outside an execution are all kept
        metric("e6", "", "", 10, now + 9),
    ]
    warehouse.write(rows, "1-0")
    assert count(tmp_path, "SELECT count(*) FROM metrics") == 6
    assert count(tmp_path, "SELECT sum(value) FROM metrics WHERE node = 'count'") == 2
    assert count(tmp_path, "SELECT count(*) FROM metrics WHERE event_id = 'e2'") == 0
    warehouse.close()


def _redis_entry(fields: list[Any]) -> list[bytes]:
    """An XADD field list as XREADGROUP returns it (bytes)."""
    return [value if isinstance(value, bytes) else str(value).encode() for value in fields]


def _engine_entries() -> tuple[list[list[bytes]], list[bytes]]:
    """The known data set and executions carrying their node runs, as the engine's writer leaves them
    (batches of 1 to 40 events), with stream ids."""
    from flowchat.events import stream_fields

    events: list[dict[str, Any]] = [
        {**{k: v for k, v in e.items() if k != "id"}, "ts": int(e["ts"]), "data": json.loads(e["data"])}
        for e in known_data_set()
    ]
    run = {"node_type": "set", "status": "ok", "attempt": 1, "started_at": 8, "duration_ms": 0.25, "error_code": ""}
    for n in range(30):
        runs = [{**run, "node": f"n{i}"} for i in range(n % 4)]
        kind = "node_runs" if n % 3 == 0 else "execution"
        data = {"status": "succeeded", "runs": runs} if runs or n % 2 else {"status": "failed"}
        events.append({"type": kind, "ts": 10 + n, "flow": "crm", "execution_id": f"x{n}", "node": "", "data": data})
    entries, start, size = [], 0, 1
    while start < len(events):
        entries.append(_redis_entry(stream_fields(events[start : start + size])))
        start, size = start + size, size % 40 + 7
    return entries, [f"{1000 + n}-{n % 3}".encode() for n in range(len(entries))]


def test_entries_table_gathers_the_engines_entries_by_column_as_the_row_path_would(monkeypatch: Any) -> None:
    from flowchat import warehouse

    entries, ids = _engine_entries()
    expected = warehouse.general_table(entries, ids)
    assert expected.num_rows > len(known_data_set())
    for stream_ids in (ids, None):
        assert warehouse.entries_table(entries, stream_ids).equals(warehouse.general_table(entries, stream_ids))

    def not_taken(*args: Any) -> None:
        raise AssertionError("the engine's entries took the row path")

    monkeypatch.setattr(warehouse, "general_table", not_taken)
    assert warehouse.entries_table(entries, ids).equals(expected)


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_VALUE = _TEXT | st.sampled_from(["node_run", "node_runs", "execution", "contact", "message", "batch", ""]) | _JSON
_RUN = st.dictionaries(st.sampled_from(["node", "status", "attempt"]), _JSON, max_size=3) | _JSON
_DATA = (
    st.fixed_dictionaries(
        {},
        optional={"phone": _JSON | _TEXT, "runs": st.lists(_RUN, max_size=3) | _JSON, "action": st.just("erased")},
    )
    | _JSON
)
_KIND = st.sampled_from(["node_run", "node_runs", "execution", "contact", "message", "metric", "batch"])
_EVENT = st.fixed_dictionaries(
    {"type": _KIND, "ts": st.integers(0, 2**40), "flow": _TEXT, "execution_id": _TEXT, "node": _TEXT, "data": _DATA}
) | st.fixed_dictionaries(
    {},
    optional={
        "type": _KIND | _VALUE,
        "ts": st.integers(0, 2**40) | _VALUE,
        "flow": _VALUE,
        "execution_id": _VALUE,
        "node": _VALUE,
        "data": _DATA,
    },
)


def _fields(kind: bytes, data: bytes, event_id: bytes = b"", ts: bytes = b"5") -> list[bytes]:
    """An entry in the engine's field order."""
    names = (b"id", b"type", b"ts", b"flow", b"execution_id", b"node", b"data")
    return [item for pair in zip(names, (event_id, kind, ts, b"f", b"x", b"", data), strict=True) for item in pair]


_DEEP = b'{"runs":[{"node":"a"}],"deep":' + b"[" * 300 + b"]" * 300 + b"}"
_METRIC = b'{"type":"metric","ts":1,"flow":"","execution_id":"","node":"","data":{}}'
_ODD_ENTRIES = [
    _fields(b"batch", b'{"events":{"type":"metric"}}'),
    _fields(b"batch", b'{"events":[]}'),
    _fields(b"batch", b'{"events":[1, null, ' + _METRIC + b"]}"),
    _fields(b"batch", b"[not json"),
    _fields(b"execution", b'{"runs": [not json'),
    _fields(b"execution", _DEEP),
    _fields(b"node_runs", _DEEP),
    _fields(b"execution", b'{"status":"runs"}'),
    _fields(b"execution", b'{"runs":[{"node":"a"},[],{"node":7,"status":"ok"}]}', event_id=b"given"),
    _fields(b"batch", b'{"events":[' + _METRIC + b"]}", b"b1"),
    _fields(b"metric", b"{}", ts=b""),
    _fields(b"metric", b""),
    _fields(b"message", b'{"phone":"+14155550100","sid":"SM1"}'),
    _fields(b"contact", b'{"phone":12}'),
    _fields(b"metric", b"{}", ts=b"12345678901234567890123"),
    _fields(b"metric", b"{}", ts=b"-4"),
    _fields(b"metric", b"{}", ts=b"+4"),
    _fields(b"m\xff", b"{}"),
]


@st.composite
def _entries(draw: st.DrawFn) -> list[list[bytes]]:
    """Entries of any shape: the engine's batches and single events (of odd events), odd entries, and
    hand-made field lists."""
    from flowchat.events import stream_fields

    entries = []
    for _ in range(draw(st.integers(1, 4))):
        shape = draw(st.sampled_from(["batch", "batch", "single", "carrier", "odd", "raw"]))
        if shape == "raw":
            names = draw(st.lists(st.sampled_from(["id", "type", "ts", "flow", "execution_id", "node", "data"])))
            values = draw(st.lists(st.binary(max_size=8) | _TEXT.map(str.encode), min_size=len(names)))
            entries.append([item for pair in zip([n.encode() for n in names], values, strict=False) for item in pair])
        elif shape == "odd":
            entries.append(draw(st.sampled_from(_ODD_ENTRIES)))
        elif shape == "batch":  # the events as drawn (keys may be missing)
            events = draw(st.lists(_EVENT, max_size=4))
            entries.append(_fields(b"batch", orjson.dumps({"events": events}, default=str), ts=b"0"))
        else:
            event = {"type": "", "ts": 0, "flow": "", "execution_id": "", "node": "", "data": {}, **draw(_EVENT)}
            if shape == "carrier":
                runs = draw(st.lists(_RUN, max_size=3))
                event |= {"type": draw(st.sampled_from(["execution", "node_runs"])), "data": {"a": 1, "runs": runs}}
            entries.append(_redis_entry(stream_fields([event])))
    return entries


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_entries(), st.booleans())
def test_entries_table_matches_the_row_path_for_any_entries(entries: list[list[bytes]], with_ids: bool) -> None:
    from flowchat.warehouse import general_table

    ids = [f"{n}-0".encode() for n in range(len(entries))] if with_ids else None
    try:
        expected = general_table(entries, ids)
    except Exception as exc:  # the row path's own failures (a ts over 64 bits) stay as they were
        with pytest.raises(type(exc)):
            entries_table(entries, ids)
        return
    assert entries_table(entries, ids).equals(expected)
