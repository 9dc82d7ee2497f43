"""The analytics warehouse: events as Parquet files by day, and ``analytics.duckdb`` with views over them.

Layout under the data dir::

    analytics/events/day=2026-11-30/b-<first stream id>.parquet   one per sink batch and day
    analytics/events/day=2026-11-30/c-<uuid>.parquet              compacted small files
    analytics/tombstones.json                                     erased phones (sha256) and when
    analytics.duckdb                                              views only; rebuilt whole, renamed in

Why this shape: a DuckDB file held open for writing locks every other process out, so the sink never
opens ``analytics.duckdb`` for long. It writes Parquet (an Arrow table through DuckDB's ``COPY``; a
temporary name, fsync, rename), and ``analytics.duckdb`` holds only views over a glob of those files,
so a new batch is visible without touching it. The views file is rebuilt (temporary file, then
rename) only when its definitions change: the first file appears, or a phone is erased.

Exactly once: every event carries a unique id. A batch is named after its first stream id, so a
batch redone after a crash usually overwrites itself; whatever still doubles is removed by the views
(``DISTINCT ON (id)``) and physically by compaction.

Erasure: an ``erased`` contact event adds a tombstone (the phone's sha256 and the erasure time); the
views drop every row of that phone up to then, at once, because they read the tombstones from the
views file. The next compaction rewrites each file holding such rows without them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import operator
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from flowchat.events import unpack

log = logging.getLogger("flowchat.warehouse")

COLUMNS = ("id", "type", "ts", "flow", "execution_id", "node", "data", "phone")
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("type", pa.string()),
        ("ts", pa.int64()),
        ("flow", pa.string()),
        ("execution_id", pa.string()),
        ("node", pa.string()),
        ("data", pa.string()),
        ("phone", pa.string()),
    ]
)
VIEWS = ("executions", "node_runs", "messages", "metrics", "contact_events")
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Tombstone:
    """An erased phone: its sha256 and the erasure time (epoch ms); ``purged`` once compaction removed it."""

    phone_hash: str
    erased_at: int
    purged: bool = False


def phone_hash(phone: str) -> str:
    return hashlib.sha256(phone.encode()).hexdigest()


def day_of(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).strftime("%Y-%m-%d")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def event_row(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """One stream entry's fields (bytes or str) as a row; ``phone`` lifted out of data for erasure."""
    get = {_text(k): _text(v) for k, v in fields.items()}
    data = get.get("data") or "{}"
    phone: str | None = None
    kind = get.get("type", "")
    if kind in ("contact", "message"):
        try:
            phone = json.loads(data).get("phone") or None
        except (ValueError, AttributeError):
            phone = None
    try:
        ts = int(get.get("ts") or 0)
    except ValueError:
        ts = 0
    return {
        "id": get.get("id", ""),
        "type": kind,
        "ts": ts,
        "flow": get.get("flow", ""),
        "execution_id": get.get("execution_id", ""),
        "node": get.get("node", ""),
        "data": data,
        "phone": phone,
    }


def rows_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows (as :func:`event_row` makes them) as an Arrow table."""
    return pa.Table.from_pydict({c: [r[c] for r in rows] for c in COLUMNS}, schema=SCHEMA)


FIELD_ORDER = [c.encode() for c in COLUMNS[:-1]]
"""The order the events writer sets the fields in: entries in it take the fastest path."""
_PHONE_TYPES = (b"contact", b"message")


def entries_table(entries: Sequence[Sequence[bytes]], entry_ids: Sequence[bytes] | None = None) -> pa.Table:
    """Stream entries (each its flat ``[field, value, ...]`` list of bytes, as Redis sends it) as Arrow.

    The engine's entries (its field order, a ts and data in each) are gathered column by column
    (:class:`_Columns`); anything else takes :func:`general_table`, which gives the same table for
    the engine's entries and also takes any field order and odd values.
    """
    try:
        return _columns(entries, entry_ids).table()
    except _Unusual:
        return general_table(entries, entry_ids)


def general_table(entries: Sequence[Sequence[bytes]], entry_ids: Sequence[bytes] | None = None) -> pa.Table:
    """:func:`entries_table` for any entries, row by row (rows made by :func:`flowchat.events.unpack`).

    The columns come from one ``zip`` and are decoded and converted (``ts`` to int) by Arrow.
    Entries with other fields or order go through a dict; anything odd (text that is not UTF-8, a
    ts that is not a number) falls back to the row-by-row path, which never fails. An event without
    an id gets its stream entry's id (``entry_ids``), so it is neither lost nor merged with another.
    """
    entries, entry_ids = _expand(entries, entry_ids)
    table = _entries_table(entries)
    if entry_ids is not None and pc.any(pc.equal(table["id"], "")).as_py():
        stream_ids = pa.array(entry_ids, pa.binary()).cast(pa.string())
        fixed = pc.if_else(
            pc.equal(table["id"], ""), pc.binary_join_element_wise("stream-", stream_ids, ""), table["id"]
        )
        table = table.set_column(0, "id", fixed)
    return table


class _Unusual(Exception):
    """Entries the column-by-column path leaves to :func:`general_table`."""


_Text = str | bytes
"""A text value as Redis sent it (bytes) or as orjson read it (str): Arrow decodes or checks both."""


@dataclass(slots=True)
class _Columns:
    """Rows gathered column by column, as :func:`general_table` would make them."""

    ids: list[_Text] = field(default_factory=list)
    types: list[_Text] = field(default_factory=list)
    stamps: list[_Text] = field(default_factory=list)
    flows: list[_Text] = field(default_factory=list)
    executions: list[_Text] = field(default_factory=list)
    nodes: list[_Text] = field(default_factory=list)
    datas: list[_Text] = field(default_factory=list)
    phones: list[str | None] = field(default_factory=list)

    def add(self, row: Sequence[_Text], phone: str | None) -> None:
        """One row: id, type, ts, flow, execution_id, node, data."""
        self.ids.append(row[0])
        self.types.append(row[1])
        self.stamps.append(row[2])
        self.flows.append(row[3])
        self.executions.append(row[4])
        self.nodes.append(row[5])
        self.datas.append(row[6])
        self.phones.append(phone)

    def table(self) -> pa.Table:
        try:
            text = [_utf8(c) for c in (self.ids, self.types, self.flows, self.executions, self.nodes, self.datas)]
            stamps = _utf8(self.stamps).cast(pa.int64())
            phones = pa.array(self.phones, pa.string())
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            raise _Unusual from exc
        return pa.table([text[0], text[1], stamps, text[2], text[3], text[4], text[5], phones], schema=SCHEMA)


def _utf8(values: list[_Text]) -> pa.Array:
    return pa.array(values, pa.binary()).cast(pa.string())


def _columns(entries: Sequence[Sequence[bytes]], entry_ids: Sequence[bytes] | None) -> _Columns:
    """The rows of ``entries``; :class:`_Unusual` for an entry the engine would not write."""
    columns = _Columns()
    for index, flat in enumerate(entries):
        if len(flat) != 14 or flat[0::2] != FIELD_ORDER:
            raise _Unusual
        stream_id = None if entry_ids is None else b"stream-" + entry_ids[index]
        try:
            _add_entry(columns, flat[1::2], stream_id)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:  # orjson's errors are ValueErrors
            raise _Unusual from exc
    return columns


def _add_entry(columns: _Columns, values: Sequence[bytes], stream_id: bytes | None) -> None:
    """One entry's rows: its events (a batch), itself and the node runs it carries, or itself."""
    event_id, kind, ts, flow, execution_id, node, data = values
    if not ts or not data:
        raise _Unusual
    row_id = event_id or stream_id or b""
    base = (event_id or stream_id or b"stream-").decode()
    if kind == b"batch":
        _add_batch(columns, data, base)
    elif kind in (b"node_runs", b"execution") and b'"runs"' in data:
        _add_carrier(columns, (row_id, kind.decode(), ts, flow, execution_id, node, data), base, orjson.loads(data))
    else:
        columns.add((row_id, kind, ts, flow, execution_id, node, data), _phone(data) if kind in _PHONE_TYPES else None)


_EVENT = operator.itemgetter("type", "ts", "flow", "execution_id", "node", "data")
_CARRIERS = frozenset(("node_runs", "execution"))
_PHONE_KINDS = frozenset(("contact", "message"))


def _add_batch(columns: _Columns, data: bytes, base: str) -> None:
    """A ``batch`` entry's events (``<base>:<n>``), column by column while none needs a closer look."""
    document = orjson.loads(data)
    events = document.get("events") if type(document) is dict else None
    if type(events) is not list:
        raise _Unusual
    if not events:
        return
    kinds, stamps, flows, executions, nodes, datas = zip(*map(_EVENT, events), strict=True)
    if not all(set(map(type, texts)) == {str} for texts in (kinds, flows, executions, nodes)) or "batch" in kinds:
        raise _Unusual
    texts = [orjson.dumps(value).decode() for value in datas]
    times = [str(stamp) or "0" for stamp in stamps]
    ids = [f"{base}:{number}" for number in range(len(events))]
    if _CARRIERS.isdisjoint(kinds) and _PHONE_KINDS.isdisjoint(kinds):
        for column, values in zip(_lists(columns), (ids, kinds, times, flows, executions, nodes, texts), strict=True):
            column.extend(values)
        columns.phones.extend([None] * len(ids))
        return
    for row in zip(ids, kinds, times, flows, executions, nodes, texts, strict=True):
        kind, text = row[1], row[6]
        if kind in _CARRIERS and '"runs"' in text:
            _add_carrier(columns, row, row[0], orjson.loads(text))
        else:
            columns.add(row, _phone(text) if kind in _PHONE_KINDS else None)


def _lists(columns: _Columns) -> tuple[list[_Text], ...]:
    return (columns.ids, columns.types, columns.stamps, columns.flows, columns.executions, columns.nodes, columns.datas)


def _add_carrier(columns: _Columns, row: Sequence[_Text], base: str, data: Any) -> None:
    """An ``execution`` or ``node_runs`` event with ``data.runs``: the execution's row, then a ``node_run``
    row per run (``<base>:<n>``), as :func:`flowchat.events.unpack` gives them."""
    runs = data.pop("runs", None) if type(data) is dict else None
    if type(runs) is not list:
        columns.add(row, None)
        return
    _, kind, ts, flow, execution_id, _, raw = row
    if kind == "execution":
        columns.add((*row[:6], _json_text(data, raw)), None)
    for number, run in enumerate(runs):
        if type(run) is dict:
            node = str(run.pop("node", ""))
            columns.add((f"{base}:{number}", "node_run", ts, flow, execution_id, node, _json_text(run, "{}")), None)


def _json_text(value: Any, otherwise: _Text) -> _Text:
    """``value`` as JSON again, as :func:`flowchat.events.unpack` writes it."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError: nesting over 254 levels
        return otherwise


_NESTING = (b"batch", b"node_runs", b"execution")


def _expand(
    entries: Sequence[Sequence[bytes]], entry_ids: Sequence[bytes] | None
) -> tuple[Sequence[Sequence[bytes]], Sequence[bytes] | None]:
    """Entries that hold other events (a batch, node runs) as one row per event (:func:`flowchat.events.unpack`)."""
    if not any(_nests(flat) for flat in entries):
        return entries, entry_ids
    out: list[Sequence[bytes]] = []
    ids: list[bytes] = []
    for index, flat in enumerate(entries):
        stream_id = entry_ids[index] if entry_ids is not None else b""
        if not _nests(flat):
            out.append(flat)
            ids.append(stream_id)
            continue
        fields = dict(zip(flat[0::2], flat[1::2], strict=False))
        for row in unpack(fields, fields.get(b"id") or b"stream-" + stream_id):
            out.append([item for key in FIELD_ORDER for item in (key, row.get(key) or _DEFAULTS.get(key, b""))])
            ids.append(stream_id)
    return out, ids if entry_ids is not None else None


_DEFAULTS = {b"ts": b"0", b"data": b"{}"}


def _nests(flat: Sequence[bytes]) -> bool:
    if len(flat) == 14 and flat[0::2] == FIELD_ORDER:
        return flat[3] in _NESTING
    return dict(zip(flat[0::2], flat[1::2], strict=False)).get(b"type") in _NESTING


def _entries_table(entries: Sequence[Sequence[bytes]]) -> pa.Table:
    if all(f[0::2] == FIELD_ORDER for f in entries):
        values: list[Sequence[bytes]] = [f[1::2] for f in entries]
    else:
        values = [_ordered(f) for f in entries]
    try:
        ids, types, ts, flows, executions, nodes, datas = zip(*values, strict=True) if values else ((),) * 7
        phones = [_phone(d) if t in _PHONE_TYPES else None for t, d in zip(types, datas, strict=True)]
        text = [pa.array(c, pa.binary()).cast(pa.string()) for c in (ids, types, flows, executions, nodes, datas)]
        stamps = pa.array(ts, pa.binary()).cast(pa.string()).cast(pa.int64())
        arrays = [text[0], text[1], stamps, text[2], text[3], text[4], text[5], pa.array(phones, pa.string())]
        return pa.table(arrays, schema=SCHEMA)
    except (pa.ArrowInvalid, TypeError, ValueError):
        return rows_table([event_row(dict(zip(f[0::2], f[1::2], strict=False))) for f in entries])


def _ordered(flat: Sequence[bytes]) -> tuple[bytes, ...]:
    fields = dict(zip(flat[0::2], flat[1::2], strict=False))
    found = tuple(fields.get(key, b"") for key in FIELD_ORDER)
    return (*found[:2], found[2] or b"0", *found[3:6], found[6] or b"{}")


def _phone(data: _Text) -> str | None:
    try:
        phone = json.loads(data).get("phone")
    except (ValueError, AttributeError):
        return None
    return phone if isinstance(phone, str) and phone else None


def erasures(table: pa.Table) -> list[Tombstone]:
    """The tombstones a batch's ``erased`` contact events ask for."""
    contacts = table.filter(pc.equal(table["type"], "contact"))
    found = []
    for row in contacts.filter(pc.match_substring(contacts["data"], '"erased"')).to_pylist():
        try:
            if row["phone"] and json.loads(row["data"]).get("action") == "erased":
                found.append(Tombstone(phone_hash(row["phone"]), row["ts"]))
        except ValueError:
            continue
    return found


class Warehouse:
    """Parquet partitions, tombstones and the views file under one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "analytics"
        self.events_dir = self.root / "events"
        self.tombstones_path = self.root / "tombstones.json"
        self.views_path = data_dir / "analytics.duckdb"
        self.events_dir.mkdir(parents=True, exist_ok=True)
        self._con = duckdb.connect(config={"threads": 2})
        self._published: tuple[bool, tuple[tuple[str, int], ...]] | None = None
        self._remove_leftovers()

    def close(self) -> None:
        self._con.close()

    # --- writing --------------------------------------------------------------------------

    def write(self, batch: pa.Table | Sequence[Mapping[str, Any]], name: str) -> list[Path]:
        """Write one batch (a Parquet file per day it spans), durably; tombstones first; views if changed."""
        table = batch if isinstance(batch, pa.Table) else rows_table(batch)
        if not table.num_rows:
            return []
        new = erasures(table)
        if new:
            self.add_tombstones(new)
        written = []
        days = pc.divide(table["ts"], DAY_MS)
        unique = days.unique().to_pylist()
        for day in sorted(unique):
            part = table if len(unique) == 1 else table.filter(pc.equal(days, day))
            path = self.events_dir / f"day={day_of(day * DAY_MS)}" / f"b-{name}.parquet"
            written.append(self._copy(part, path))
        self.publish()
        return written

    def _copy(self, table: pa.Table, path: Path, sql: str = "SELECT * FROM batch") -> Path:
        """COPY an Arrow table (or a query over ``batch``) to a Parquet file: temporary name, fsync, rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        self._con.register("batch", table)
        try:
            self._con.execute(f"COPY ({sql}) TO '{_quote(temporary)}' (FORMAT parquet, COMPRESSION zstd)")
        finally:
            self._con.unregister("batch")
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
        return path

    def files(self) -> list[Path]:
        return sorted(self.events_dir.glob("day=*/*.parquet"))

    # --- tombstones -----------------------------------------------------------------------

    def tombstones(self) -> list[Tombstone]:
        if not self.tombstones_path.exists():
            return []
        return [Tombstone(**item) for item in json.loads(self.tombstones_path.read_text())]

    def add_tombstones(self, new: list[Tombstone]) -> None:
        known = {t.phone_hash: t for t in self.tombstones()}
        for tomb in new:
            old = known.get(tomb.phone_hash)
            if old is None or old.erased_at < tomb.erased_at:
                known[tomb.phone_hash] = tomb
        self._save_tombstones(list(known.values()))

    def _save_tombstones(self, tombs: list[Tombstone]) -> None:
        body = json.dumps([t.__dict__ for t in sorted(tombs, key=lambda t: t.phone_hash)])
        _atomic_write(self.tombstones_path, body.encode())

    # --- the views file -------------------------------------------------------------------

    def publish(self, force: bool = False) -> bool:
        """Rebuild ``analytics.duckdb`` if its definitions changed (or ``force``); True when rebuilt."""
        state = (bool(self.files()), tuple((t.phone_hash, t.erased_at) for t in self.tombstones()))
        if not force and state == self._published and self.views_path.exists():
            return False
        temporary = self.views_path.with_name(f".{self.views_path.name}.{uuid.uuid4().hex}.tmp")
        try:
            con = duckdb.connect(str(temporary))
            try:
                for statement in view_statements(self.events_dir, state[0], self.tombstones()):
                    con.execute(statement)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            _fsync(temporary)
            os.replace(temporary, self.views_path)
            _fsync(self.views_path.parent)
        finally:
            temporary.unlink(missing_ok=True)
            Path(str(temporary) + ".wal").unlink(missing_ok=True)
        self._published = state
        return True

    # --- compaction and retention ---------------------------------------------------------

    def compact(self, min_files: int = 4, small_bytes: int = 64 * 1024 * 1024) -> int:
        """Merge each day's small files into one (deduplicated, erased rows dropped); files rewritten."""
        tombs = self.tombstones()
        pending = [t for t in tombs if not t.purged]
        rewritten = 0
        for day_dir in sorted(self.events_dir.glob("day=*")):
            files = sorted(day_dir.glob("*.parquet"))
            small = [f for f in files if f.stat().st_size < small_bytes]
            chosen = small if len(small) >= min_files else []
            if pending:
                chosen = sorted(set(chosen) | set(self._holding(files, pending)))
            if chosen:
                self._merge(day_dir, chosen, tombs)
                rewritten += len(chosen)
        if pending:
            self._save_tombstones([Tombstone(t.phone_hash, t.erased_at, True) for t in tombs])
        if rewritten:
            log.info("compacted %d analytics file(s)", rewritten)
        return rewritten

    def _holding(self, files: list[Path], tombs: list[Tombstone]) -> list[Path]:
        """The files with rows of an erased phone."""
        if not files:
            return []
        self._con.register("tombs", _tomb_table(tombs))
        try:
            found = self._con.execute(
                f"SELECT DISTINCT filename FROM read_parquet({_list(files)}, filename=true) e "
                "JOIN tombs t ON t.phone_hash = sha256(e.phone) AND e.ts <= t.erased_at"
            ).fetchall()
        finally:
            self._con.unregister("tombs")
        return [Path(name) for (name,) in found]

    def _merge(self, day_dir: Path, files: list[Path], tombs: list[Tombstone]) -> None:
        """Write the union of ``files`` as one new file, then remove them (the views dedupe meanwhile)."""
        self._con.register("tombs", _tomb_table(tombs))
        try:
            sql = (
                f"SELECT DISTINCT ON (id) {', '.join(COLUMNS)} FROM read_parquet({_list(files)}) e "
                "WHERE NOT EXISTS (SELECT 1 FROM tombs t WHERE t.phone_hash = sha256(e.phone) AND e.ts <= t.erased_at) "
                "ORDER BY id"
            )
            empty = pa.Table.from_pydict({c: [] for c in COLUMNS}, schema=SCHEMA)
            target = day_dir / f"c-{uuid.uuid4().hex}.parquet"
            self._copy(empty, target, f"SELECT * FROM ({sql}) ORDER BY ts")
        finally:
            self._con.unregister("tombs")
        for path in files:
            path.unlink(missing_ok=True)
        _fsync(day_dir)

    def expire(self, retention_days: int, now_ms: int) -> int:
        """Remove the day partitions older than ``retention_days`` (0 keeps everything); days removed."""
        if retention_days <= 0:
            return 0
        oldest = day_of(now_ms - retention_days * DAY_MS)
        removed = 0
        for day_dir in self.events_dir.glob("day=*"):
            if day_dir.name.removeprefix("day=") < oldest:
                shutil.rmtree(day_dir, ignore_errors=True)
                removed += 1
        if removed:
            self.publish()
        return removed

    def _remove_leftovers(self) -> None:
        """Temporary files of a writer killed mid-write are never visible (wrong suffix); remove them."""
        for path in self.events_dir.glob("day=*/*.tmp"):
            path.unlink(missing_ok=True)
        for path in self.data_dir.glob(f".{self.views_path.name}.*.tmp*"):
            path.unlink(missing_ok=True)


def view_statements(events_dir: Path, have_files: bool, tombs: list[Tombstone]) -> list[str]:
    """The SQL that creates the views file: tombstones, a deduplicated ``events`` view, the five views."""
    statements = ["CREATE TABLE erased (phone_hash VARCHAR, erased_at BIGINT)"]
    if tombs:
        values = ", ".join(f"('{t.phone_hash}', {int(t.erased_at)})" for t in tombs)
        statements.append(f"INSERT INTO erased VALUES {values}")
    if have_files:
        source = f"read_parquet('{_quote(events_dir)}/day=*/*.parquet', union_by_name=true)"
    else:
        source = (
            "(SELECT NULL::VARCHAR AS id, NULL::VARCHAR AS type, NULL::BIGINT AS ts, NULL::VARCHAR AS flow, "
            "NULL::VARCHAR AS execution_id, NULL::VARCHAR AS node, NULL::VARCHAR AS data, NULL::VARCHAR AS phone "
            "WHERE false)"
        )
    statements.append(
        f"CREATE VIEW events AS SELECT * REPLACE (CASE WHEN json_valid(data) THEN data ELSE '{{}}' END AS data) "
        f"FROM (SELECT DISTINCT ON (id) {', '.join(COLUMNS)} FROM {source}) e "
        "WHERE e.phone IS NULL OR NOT EXISTS "
        "(SELECT 1 FROM erased t WHERE t.phone_hash = sha256(e.phone) AND e.ts <= t.erased_at)"
    )
    statements += [VIEW_SQL[name] for name in VIEWS]
    return statements


def _ms(expr: str) -> str:
    return f"epoch_ms(TRY_CAST({expr} AS BIGINT))"


# Outbound statuses only move forward; the current one is the furthest reached (then the latest).
_RANK = (
    "CASE status WHEN 'queued' THEN 1 WHEN 'accepted' THEN 1 WHEN 'scheduled' THEN 1 WHEN 'sending' THEN 2 "
    "WHEN 'sent' THEN 3 WHEN 'simulated' THEN 3 WHEN 'received' THEN 3 WHEN 'delivered' THEN 4 WHEN 'read' THEN 5 "
    "WHEN 'failed' THEN 6 WHEN 'undelivered' THEN 6 ELSE 0 END"
)

VIEW_SQL = {
    "executions": f"""CREATE VIEW executions AS
SELECT execution_id, flow, data->>'flow_version' AS flow_version, data->>'trigger_type' AS trigger_type,
       data->>'status' AS status, {_ms("data->>'started_at'")} AS started_at,
       {_ms("data->>'finished_at'")} AS finished_at, TRY_CAST(data->>'duration_ms' AS DOUBLE) AS duration_ms,
       TRY_CAST(data->>'attempts' AS INTEGER) AS attempts, NULLIF(data->>'error_code', '') AS error_code,
       epoch_ms(ts) AS ts, id AS event_id
FROM events WHERE type = 'execution'
QUALIFY row_number() OVER (PARTITION BY execution_id ORDER BY ts DESC, id DESC) = 1""",
    "node_runs": f"""CREATE VIEW node_runs AS
SELECT execution_id, flow, node, data->>'node_type' AS node_type, data->>'status' AS status,
       TRY_CAST(data->>'attempt' AS INTEGER) AS attempt, {_ms("data->>'started_at'")} AS started_at,
       TRY_CAST(data->>'duration_ms' AS DOUBLE) AS duration_ms, NULLIF(data->>'error_code', '') AS error_code,
       epoch_ms(ts) AS ts, id AS event_id
FROM events WHERE type = 'node_run'""",
    "metrics": """CREATE VIEW metrics AS
SELECT epoch_ms(ts) AS ts, flow, execution_id, node, data->>'name' AS name,
       TRY_CAST(data->>'value' AS DOUBLE) AS value,
       COALESCE(TRY_CAST(data->'tags' AS MAP(VARCHAR, VARCHAR)), MAP()) AS tags, id AS event_id
FROM events WHERE type = 'metric'
QUALIFY row_number() OVER (
  PARTITION BY CASE WHEN COALESCE(execution_id, '') = '' THEN id ELSE concat_ws('/', execution_id, node, data) END
  ORDER BY ts, id) = 1""",
    "contact_events": """CREATE VIEW contact_events AS
SELECT epoch_ms(ts) AS ts, data->>'action' AS action, phone, flow, execution_id, node,
       TRY_CAST(data->'tags' AS VARCHAR[]) AS tags, TRY_CAST(data->'groups' AS VARCHAR[]) AS groups,
       data->>'source' AS source, id AS event_id
FROM events WHERE type = 'contact'""",
    "messages": f"""CREATE VIEW messages AS
WITH m AS (
  SELECT ts, NULLIF(execution_id, '') AS execution_id, NULLIF(flow, '') AS flow, NULLIF(node, '') AS node,
         data->>'sid' AS sid, data->>'direction' AS direction, phone, data->>'status' AS status,
         NULLIF(data->>'error_code', '') AS error_code, TRY_CAST(data->>'template' AS BOOLEAN) AS template
  FROM events WHERE type = 'message')
SELECT sid, max(execution_id) AS execution_id, max(flow) AS flow, max(node) AS node,
       max(direction) AS direction, max(phone) AS phone,
       arg_max(status, ({_RANK}) * 10000000000000 + ts) AS status,
       arg_max(error_code, ts) FILTER (WHERE error_code IS NOT NULL) AS error_code,
       bool_or(template) AS template,
       epoch_ms(min(ts)) AS first_at, epoch_ms(max(ts)) AS updated_at,
       epoch_ms(min(ts) FILTER (WHERE status IN ('queued', 'accepted', 'scheduled'))) AS queued_at,
       epoch_ms(min(ts) FILTER (WHERE status = 'sending')) AS sending_at,
       epoch_ms(min(ts) FILTER (WHERE status = 'sent')) AS sent_at,
       epoch_ms(min(ts) FILTER (WHERE status = 'delivered')) AS delivered_at,
       epoch_ms(min(ts) FILTER (WHERE status = 'read')) AS read_at,
       epoch_ms(min(ts) FILTER (WHERE status IN ('failed', 'undelivered'))) AS failed_at,
       epoch_ms(min(ts) FILTER (WHERE status = 'received')) AS received_at,
       epoch_ms(min(ts) FILTER (WHERE status = 'simulated')) AS simulated_at
FROM m WHERE sid IS NOT NULL GROUP BY sid""",
}


def _tomb_table(tombs: list[Tombstone]) -> pa.Table:
    return pa.table(
        {"phone_hash": [t.phone_hash for t in tombs], "erased_at": [t.erased_at for t in tombs]},
        schema=pa.schema([("phone_hash", pa.string()), ("erased_at", pa.int64())]),
    )


def _quote(path: Path) -> str:
    return str(path.resolve()).replace("'", "''")


def _list(files: list[Path]) -> str:
    return "[" + ", ".join(f"'{_quote(f)}'" for f in files) + "]"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, body: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync(path.parent)
