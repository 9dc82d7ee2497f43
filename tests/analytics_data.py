"""A known events data set (the contract's stream format) for the analytics tests, and stream helpers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import redis as sync_redis
from support import wait_for

from flowchat.keys import Keys

STREAM = Keys().events
HOUR_MS = 3_600_000
ALICE, BOB, CAROL, DAVE = "+14155550101", "+14155550102", "+14155550103", "+14155550104"


class Recorder:
    """Builds events with increasing timestamps, starting ``hours_ago`` hours before now."""

    def __init__(self, hours_ago: float = 2.0) -> None:
        self.ts = int(time.time() * 1000 - hours_ago * HOUR_MS)
        self.events: list[dict[str, str]] = []

    def add(self, kind: str, data: dict[str, Any], flow: str = "", execution: str = "", node: str = "") -> None:
        self.ts += 1000
        self.events.append(
            {
                "id": uuid.uuid4().hex,
                "type": kind,
                "ts": str(self.ts),
                "flow": flow,
                "execution_id": execution,
                "node": node,
                "data": json.dumps(data),
            }
        )

    def execution(self, flow: str, execution: str, status: str, duration_ms: int, error_code: str = "") -> None:
        started = self.ts
        self.add(
            "execution",
            {
                "flow_version": "v1",
                "trigger_type": "webhook",
                "status": status,
                "started_at": started,
                "finished_at": started + duration_ms,
                "duration_ms": duration_ms,
                "attempts": 1,
                "error_code": error_code,
            },
            flow,
            execution,
        )

    def node_run(
        self, flow: str, execution: str, node: str, node_type: str, status: str, ms: int, code: str = ""
    ) -> None:
        data = {"node_type": node_type, "status": status, "attempt": 1, "started_at": self.ts, "duration_ms": ms}
        self.add("node_run", {**data, "error_code": code}, flow, execution, node)

    def message(self, sid: str, phone: str, status: str, code: str = "", flow: str = "", execution: str = "") -> None:
        direction = "inbound" if status == "received" else "outbound"
        data = {"sid": sid, "direction": direction, "phone": phone, "status": status, "error_code": code}
        self.add("message", {**data, "template": False}, flow, execution, "send" if execution else "")


def known_data_set() -> list[dict[str, str]]:
    """Two flows; a message funnel with failures; metrics with tags; consent and an erasure.

    welcome: 10 executions (8 succeeded, 2 failed at node ``send`` with twilio-63016 and twilio-21211),
    durations 100..1000 ms; broadcast: 4 succeeded, 50 ms each. Outbound messages (welcome): SM1
    read (via delivered), SM2 delivered, SM3 read (no delivered callback), SM4 failed twilio-30008,
    SM5 undelivered twilio-30003, SM6 sent; SM7 to Dave, who is then erased. Alice replies (SMin1).
    """
    r = Recorder()
    for i in range(10):
        failed = i in (3, 7)
        x = f"w{i}"
        r.node_run("welcome", x, "lookup", "contact.lookup", "ok", 5)
        code = {3: "twilio-63016", 7: "twilio-21211"}.get(i, "")
        r.node_run("welcome", x, "send", "whatsapp.send", "failed" if failed else "ok", 40 + i, code)
        r.execution("welcome", x, "failed" if failed else "succeeded", 100 * (i + 1), code)
    for i in range(4):
        r.node_run("broadcast", f"b{i}", "send", "whatsapp.send", "ok", 20)
        r.execution("broadcast", f"b{i}", "succeeded", 50)
    r.node_run("welcome", "w0", "send", "whatsapp.send", "retried", 1)
    r.node_run("welcome", "w1", "send", "whatsapp.send", "retried", 1)
    phones = [ALICE, BOB, CAROL, ALICE, BOB, CAROL]
    for n, phone in enumerate(phones, start=1):
        r.message(f"SM{n}", phone, "queued", flow="welcome", execution=f"w{n}")
    for sid, steps in {
        "SM1": ["sent", "delivered", "read"],
        "SM2": ["sent", "delivered"],
        "SM3": ["sent", "read"],
        "SM4": ["sent", "failed:twilio-30008"],
        "SM5": ["undelivered:twilio-30003"],
        "SM6": ["sent"],
    }.items():
        phone = phones[int(sid[2:]) - 1]
        for step in steps:
            status, _, code = step.partition(":")
            r.message(sid, phone, status, code)
    r.message("SMin1", ALICE, "received")
    r.add("contact", {"action": "tagged", "phone": ALICE, "tags": ["vip", "spring"]}, "welcome", "w1", "tag")
    r.add("contact", {"action": "tagged", "phone": BOB, "tags": ["lead"]}, "welcome", "w2", "tag")
    r.add("contact", {"action": "opted_out", "phone": BOB, "source": "inbound"})
    r.add("contact", {"action": "opted_in", "phone": CAROL, "source": "inbound"})
    r.add("contact", {"action": "created", "phone": DAVE})
    r.message("SM7", DAVE, "queued", flow="welcome", execution="w9")
    r.message("SM7", DAVE, "delivered")
    r.add("contact", {"action": "erased", "phone": DAVE})
    for value, campaign in ((10.0, "spring"), (2.5, "spring"), (4.0, "fall")):
        r.add("metric", {"name": "order_value", "value": value, "tags": {"campaign": campaign}}, "welcome", "w0", "m")
    return r.events


def append(url: str, events: list[dict[str, str]]) -> None:
    """XADD events to the stream, as the runtime's events writer does."""
    client = sync_redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for index, fields in enumerate(events):
        pipe.xadd(STREAM, fields)  # type: ignore[arg-type]
        if index % 1000 == 999:
            pipe.execute()
    pipe.execute()
    client.close()


def bulk(count: int, kind: str = "node_run") -> list[dict[str, str]]:
    """``count`` simple node-run events."""
    r = Recorder(hours_ago=1)
    for i in range(count):
        r.node_run("load", f"x{i // 5}", f"n{i % 5}", "set", "ok", 1)
    return r.events


def count(data_dir: Path, sql: str) -> int:
    """One number from the views, read-only, as an analyst's process would."""
    path = data_dir / "analytics.duckdb"
    if not path.exists():
        return -1
    con = duckdb.connect(str(path), read_only=True)
    try:
        return int(con.execute(sql).fetchone()[0])  # type: ignore[index]
    finally:
        con.close()


def physical_rows(data_dir: Path) -> int:
    files = sorted((data_dir / "analytics" / "events").glob("day=*/*.parquet"))
    if not files:
        return 0
    names = ", ".join(f"'{f}'" for f in files)
    return int(duckdb.sql(f"SELECT count(*) FROM read_parquet([{names}])").fetchone()[0])  # type: ignore[index]


async def loaded(redis_url: str, start_sink: Callable[..., Any], data_dir: Path) -> list[dict[str, str]]:
    """The known data set appended to the stream and sunk into ``data_dir`` by a started sink."""
    events = known_data_set()
    append(redis_url, events)
    start_sink()
    await wait_for(lambda: count(data_dir, "SELECT count(*) FROM executions") == 14)
    return events
