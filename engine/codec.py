"""The one codec of execution state, and the node-output boundary that feeds it.

**Stored state.** One Redis hash per execution (:meth:`Keys.execution`). While it is live,
and after it failed or was cancelled (the *full* form), it holds:

- ``m``: what never changes after enqueue (``id, flow, trigger, created_at``), JSON;
- ``s``: what changes at each hand-off (``flow_version, status, started_at, finished_at, error``), JSON;
- ``n:<node id>``: one :class:`NodeRun`, JSON object, written at its checkpoint;
- ``d``: how many times the execution was delivered to a worker; ``c``: cancel requested.

When it succeeds, the finish script replaces all of that with the *compact* form
(:func:`encode_compact`), which keeps what ``executions list/show`` print but no outputs:

- ``z``: ``[flow_version, status, created_at, started_ms, finished_ms]`` (the two last in
  milliseconds after ``created_at``), JSON;
- ``f``: the flow name;
- ``t``: the trigger, JSON, only when it is at most :data:`COMPACT_TRIGGER_BYTES` long;
- ``n:<node id>``: ``[status, attempts, duration_ms]``, plus the error code if the node has one,
  JSON array (a node's type comes from the stored flow version when it is read back).

Every value of a compact hash stays under Redis's ``hash-max-listpack-value`` (64 bytes) for
node ids and flow names of ordinary length, so the hash keeps Redis's small encoding. A
failed execution keeps the full form: ``dlq replay`` resumes it at its failed node, and the
nodes after it read the outputs (and the trigger) of the nodes before.

The queue, the worker, ``flowchat run`` and the operator commands all encode and
decode through the functions here; nothing else builds those JSON documents.

**Node outputs.** :func:`node_output` converts what a node's ``run`` returned, right
after it returns, into plain JSON values — in ``flowchat run`` and in workers alike,
so a flow behaves the same in both. The steps, in this order:

1. conversion (:func:`to_json`): ``str`` keys (ints, floats, bools and None become their
   JSON text), lists for tuples, sets (sorted when they can be) and any other iterable
   (generators included), ISO-8601 strings for datetimes, dates and times, seconds for
   timedeltas, UTF-8 text for bytes, plain dicts for pydantic models and dataclasses,
   enum values, ``str`` for UUIDs and paths. Header mappings (``multidict``, ``http.client``)
   become plain dicts with lower-case names; a repeated header's values are joined with
   ``", "``, except ``set-cookie``, which is always a list;
2. masking (a parameter: identity unless the runtime supplies one, e.g. secrets);
3. the size limit (``FLOWCHAT_MAX_OUTPUT``): over it, ``node-output-too-large``.

A value that cannot be converted (an arbitrary object, bytes that are not UTF-8, an integer
outside 64 bits, nesting deeper than 255) fails the node at once with the non-retryable
``node-output-invalid``, naming the key path and the type.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.message
import enum
import math
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, cast

import orjson
from pydantic import BaseModel

from flowchat.errors import NodeError
from flowchat.execution import Execution, NodeRun

__all__ = [
    "COMPACT_TRIGGER_BYTES",
    "MAX_DEPTH",
    "SUMMARY_FIELDS",
    "Stored",
    "decode_hash",
    "decode_summary",
    "dumps",
    "encode_compact",
    "encode_meta",
    "encode_run",
    "encode_state",
    "execution_json",
    "execution_from_parts",
    "identity",
    "node_output",
    "run_fields",
    "to_json",
]

MAX_DEPTH = 255
"""Deepest nesting of lists and objects an output may have (orjson's own limit is 254 levels below it)."""

COMPACT_TRIGGER_BYTES = 64
"""A succeeded execution keeps its trigger only when the trigger's JSON is at most this long."""
SUMMARY_FIELDS = ("m", "s", "z", "f", "t")
"""The hash fields a listing reads (either form), in the order :func:`decode_summary` takes them."""

_FIXED = ("id", "flow", "trigger", "created_at")
_CHANGING = ("flow_version", "status", "started_at", "finished_at", "error")
_RUN_FIELDS = frozenset(field.name for field in dataclasses.fields(NodeRun))
_INT_RANGE = (-(2**63), 2**64 - 1)  # what orjson (and so the queue) can store


# --- stored state ----------------------------------------------------------------------


def dumps(value: Any) -> str:
    """JSON text of stored state. Non-str keys are written as their JSON text, never refused."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def encode_meta(execution: Execution) -> str:
    """Field ``m``: what never changes after enqueue."""
    return dumps({name: getattr(execution, name) for name in _FIXED})


def encode_state(execution: Execution) -> str:
    """Field ``s``: what changes as the execution runs (small, rewritten at each hand-off)."""
    return dumps({name: getattr(execution, name) for name in _CHANGING})


def encode_run(run: NodeRun) -> str:
    """Field ``n:<node id>``: one node's state."""
    return dumps(run.__dict__)


def run_fields(runs: Iterable[NodeRun]) -> list[str]:
    """``[n:<id>, json, …]``: hash fields and values for ``runs``."""
    fields: list[str] = []
    for run in runs:
        fields += [f"n:{run.id}", encode_run(run)]
    return fields


def encode_compact(execution: Execution) -> list[str]:
    """``[field, value, …]`` of the compact form that replaces a succeeded execution's hash (no outputs)."""
    created = execution.created_at
    head = [execution.flow_version, execution.status, round(created, 3), _offset_ms(created, execution.started_at)]
    head.append(_offset_ms(created, execution.finished_at))
    fields = ["z", dumps(head), "f", execution.flow]
    trigger = dumps(execution.trigger)
    if len(trigger.encode()) <= COMPACT_TRIGGER_BYTES:
        fields += ["t", trigger]
    for run in execution.nodes.values():
        compact: list[Any] = [run.status, run.attempts, round(run.duration_ms, 1)]
        if run.error:
            compact.append(run.error.get("code", ""))
        fields += [f"n:{run.id}", dumps(compact)]
    return fields


def _offset_ms(base: float, moment: float | None) -> int | None:
    return None if moment is None else round((moment - base) * 1000)


def _moment(base: float, offset: Any) -> float | None:
    return None if offset is None else round(base + offset / 1000, 3)


@dataclass(frozen=True, slots=True)
class Stored:
    """An execution's stored hash, decoded: ``meta`` (fields m and s merged), node states, deliveries.

    ``compact`` when it is the compact form of a succeeded execution: its trigger (unless small)
    is None, and its nodes have no output, no times and no type.
    """

    meta: dict[str, Any]
    nodes: dict[str, dict[str, Any]]
    deliveries: int = 0
    compact: bool = False


def decode_hash(fields: Mapping[str, Any], execution_id: str = "") -> Stored | None:
    """Decode an execution hash (field names as text) of either form; None if it has neither meta.

    ``execution_id`` names the execution of a compact hash (which does not repeat its id).
    """
    deliveries = int(fields.get("d") or 0)
    if fields.get("m") is None:
        if fields.get("z") is None:
            return None  # expired, never stored, or only a delivery count left by a late read
        meta = _compact_meta(execution_id, fields["z"], fields.get("f"), fields.get("t"))
        nodes = {key[2:]: _node(key[2:], value) for key, value in fields.items() if key.startswith("n:")}
        return Stored(meta, nodes, deliveries, compact=True)
    meta = orjson.loads(fields["m"])
    if fields.get("s"):
        meta.update(orjson.loads(fields["s"]))
    nodes = {key[2:]: orjson.loads(value) for key, value in fields.items() if key.startswith("n:")}
    return Stored(meta, nodes, deliveries)


def decode_summary(execution_id: str, values: Iterable[Any]) -> dict[str, Any] | None:
    """The :data:`SUMMARY_FIELDS` of a hash (in that order) as one meta dict (listing, without nodes)."""
    m, s, z, f, t = values
    if m is not None:
        meta: dict[str, Any] = orjson.loads(m)
        if s:
            meta.update(orjson.loads(s))
        return meta
    return None if z is None else _compact_meta(execution_id, z, f, t)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _compact_meta(execution_id: str, z: Any, flow: Any, trigger: Any) -> dict[str, Any]:
    version, status, created, started, finished = orjson.loads(z)
    return {
        "id": execution_id,
        "flow": "" if flow is None else _text(flow),
        "trigger": None if trigger is None else orjson.loads(trigger),
        "created_at": created,
        "flow_version": version,
        "status": status,
        "started_at": _moment(created, started),
        "finished_at": _moment(created, finished),
        "error": None,
    }


def _node(node_id: str, value: Any) -> dict[str, Any]:
    """A compact node state (a JSON array) as a NodeRun's fields; a full one (an object) as it is."""
    stored = orjson.loads(value)
    if isinstance(stored, dict):  # a checkpoint that landed after compaction (a worker that lost its lease)
        return cast(dict[str, Any], stored)
    status, attempts, duration, *code = stored
    run = NodeRun(node_id, "", status, attempts, duration, error={"code": code[0]} if code else None)
    return dict(run.__dict__)  # what is not kept (type, output, times) is None or empty


def execution_from_parts(
    meta: dict[str, Any], nodes: dict[str, dict[str, Any]], order: Iterable[tuple[str, str]]
) -> Execution:
    """Rebuild an Execution with its nodes in ``order`` (id, type); nodes with no checkpoint yet are pending."""
    runs = {
        node_id: _run(nodes[node_id], node_type) if node_id in nodes else NodeRun(node_id, node_type)
        for node_id, node_type in order
    }
    for node_id, stored in nodes.items():  # a node the flow no longer has still shows
        if node_id not in runs:
            runs[node_id] = _run(stored)
    known: dict[str, Any] = {name: meta[name] for name in (*_FIXED, *_CHANGING) if name in meta}
    return Execution(**known, nodes=runs)


def _run(stored: dict[str, Any], node_type: str = "") -> NodeRun:
    known = {key: value for key, value in stored.items() if key in _RUN_FIELDS}
    if not known.get("type"):  # the compact form leaves the type to the flow version
        known["type"] = node_type
    return NodeRun(**known)


def execution_json(execution: Execution) -> dict[str, Any]:
    """The shape ``flowchat run --json`` and ``executions show --json`` print (a contract).

    Top level: ``id, flow, flow_version, status, trigger, nodes, created_at, started_at,
    finished_at, error``; ``nodes`` maps each node id, in flow order, to its ``id, type,
    status, attempts, duration_ms, output, error, started_at, finished_at, wake_at``.
    """
    return {
        "id": execution.id,
        "flow": execution.flow,
        "flow_version": execution.flow_version,
        "status": execution.status,
        "trigger": execution.trigger,
        "nodes": {node_id: dict(run.__dict__) for node_id, run in execution.nodes.items()},
        "created_at": execution.created_at,
        "started_at": execution.started_at,
        "finished_at": execution.finished_at,
        "error": execution.error,
    }


# --- the node-output boundary ------------------------------------------------------------


def identity(value: Any) -> Any:
    """The default mask: nothing hidden."""
    return value


def node_output(output: Any, *, mask: Callable[[Any], Any] = identity, max_bytes: int = 1024 * 1024) -> dict[str, Any]:
    """Convert what ``Node.run`` returned to plain JSON, mask it, and check its size.

    Raises :class:`NodeError` ``node-output-invalid`` (not retryable) naming the key path and the
    type of what cannot be converted, or ``node-output-too-large`` over ``max_bytes``.
    """
    if output is None or (type(output) is dict and not output):
        return {}  # the most common output of all, and nothing to convert
    data: bytes | None
    try:
        data = orjson.dumps(output)  # the common case: already plain
    except TypeError:  # orjson.JSONEncodeError included
        data, plain = None, to_json(output)
    else:
        plain = orjson.loads(data)
    if not isinstance(plain, dict):
        raise NodeError(
            f"run() must return a dict (a JSON object), got {type(output).__name__}", code="node-output-invalid"
        )
    if mask is not identity:
        plain, data = mask(plain), None  # a mask keeps the shape: the dict stays a dict
    size = len(data if data is not None else orjson.dumps(plain))
    if size > max_bytes:
        raise NodeError(
            f"output is {size} bytes as JSON, over the limit of {max_bytes} (FLOWCHAT_MAX_OUTPUT)",
            code="node-output-too-large",
            retryable=False,
        )
    return cast(dict[str, Any], plain)


def to_json(value: Any, path: str = "output") -> Any:
    """``value`` as plain JSON values (see the module docstring); NodeError ``node-output-invalid`` if it cannot be."""
    return _convert(value, path, 0)


def _invalid(path: str, value: Any, why: str = "") -> NodeError:
    reason = why or f"a {_type_name(value)} cannot be stored as JSON"
    return NodeError(f"{path}: {reason}", code="node-output-invalid", retryable=False)


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _convert(value: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise _invalid(path, value, f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise _invalid(path, value, "an integer outside the 64-bit range cannot be stored")
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping) or isinstance(value, email.message.Message):
        return _mapping(value, path, depth)
    scalar = _scalar(value, path)
    if scalar is not _NOT_SCALAR:
        return scalar
    if isinstance(value, BaseModel):
        return _convert(value.model_dump(mode="json"), path, depth)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _convert({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, path, depth)
    if isinstance(value, enum.Enum):
        return _convert(value.value, path, depth)
    if isinstance(value, set | frozenset):
        items: list[Any] = list(value)
        try:
            items.sort()
        except TypeError:
            pass  # mixed types: keep iteration order
        value = items
    if isinstance(value, Iterable) and not isinstance(value, type):
        return [_convert(item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value)]
    raise _invalid(path, value)


_NOT_SCALAR = object()


def _scalar(value: Any, path: str) -> Any:
    """Values written as one JSON string or number, or _NOT_SCALAR."""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            why = "bytes that are not UTF-8 text cannot be stored (encode them, e.g. base64)"
            raise _invalid(path, value, why) from None
    if isinstance(value, uuid.UUID | PurePath):
        return str(value)
    return _NOT_SCALAR


def _mapping(value: Any, path: str, depth: int) -> dict[str, Any]:
    if _is_headers(value):
        return _headers(value)
    result: dict[str, Any] = {}
    for key, item in value.items():
        name = _key(key, path)
        if name in result:
            raise _invalid(path, value, f"two keys become {name!r} as JSON text")
        result[name] = _convert(item, _child(path, name), depth + 1)
    return result


def _key(key: Any, path: str) -> str:
    if isinstance(key, str):
        return key.lower() if _is_header_name(key) else str(key)
    if key is None or isinstance(key, bool):
        return orjson.dumps(key).decode()
    if isinstance(key, int | float):
        return orjson.dumps(key).decode() if isinstance(key, int) or math.isfinite(key) else str(key)
    raise _invalid(path, key, f"a key of type {_type_name(key)} cannot be a JSON object key")


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if name.isidentifier() else f"{path}[{name!r}]"


def _is_header_name(key: str) -> bool:
    # multidict's case-insensitive str: its mappings are HTTP headers, read with lower-case names
    return type(key).__name__ == "istr"


def _is_headers(value: Any) -> bool:
    return isinstance(value, email.message.Message) or (
        hasattr(value, "getall") and type(value).__module__.startswith("multidict")
    )


def _headers(value: Any) -> dict[str, Any]:
    """Header names lower-cased; repeated values joined with ", " (set-cookie: always a list)."""
    collected: dict[str, list[str]] = {}
    for name, item in value.items():
        text = item.decode("latin-1") if isinstance(item, bytes) else str(item)
        collected.setdefault(str(name).lower(), []).append(text)
    return {name: items if name == "set-cookie" else ", ".join(items) for name, items in collected.items()}


async def through_codec(execution: Any, run: Any, node: object) -> None:
    """A checkpoint for in-process runs (``flowchat run``, :mod:`flowchat.testing`): the node state
    after the round trip a worker's storage gives it, so downstream nodes read what a worker would."""
    stored = orjson.loads(encode_run(run))
    run.output, run.error = stored["output"], stored["error"]
