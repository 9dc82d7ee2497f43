"""``validate``: check data against a JSON Schema (draft 2020-12).

jsonschema gives the verdict and the errors. For schemas within a plain subset (types, required
properties, lengths, bounds, enums, patterns, items) a check compiled once per schema answers first:
when it finds the data valid the node outputs ``valid: true`` without running jsonschema, which is the
common case and costs a fraction of ``iter_errors``; otherwise jsonschema runs as it always did, so the
output is the same for every input.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

from jsonschema import Draft202012Validator
from pydantic import Field, model_validator

from flowchat import JsonSchema, Node, NodeConfig, NodeContext, NodeError, SchemaFile, read_schema_file, register


@register
class Validate(Node):
    """Validate data against a JSON Schema; output {valid, errors} with each error's JSON path."""

    type = "validate"
    pure = True

    class Config(NodeConfig):
        data: Any = Field(None, description="What to validate; defaults to the trigger payload.")
        schema_: JsonSchema | None = Field(None, alias="schema", description="Inline JSON Schema (2020-12).")
        schema_file: SchemaFile | None = Field(
            None, description="JSON Schema file in the flow's folder (or below), read when the flow loads."
        )
        on_invalid: Literal["fail", "continue"] = Field("fail", description="Fail the node, or output valid: false.")

        @model_validator(mode="after")
        def _one_schema(self) -> Validate.Config:
            if (self.schema_ is None) == (self.schema_file is None):
                raise ValueError("give exactly one of schema or schema_file")
            return self

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        validator, fast = _validator_for(config.schema_, config.schema_file, ctx.flow_dir)
        data = ctx.trigger if config.data is None else config.data
        if fast is not None and _passes(fast, data):
            return {"valid": True, "errors": []}
        errors = [
            {"path": error.json_path, "message": error.message}
            for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        ]
        if errors and config.on_invalid == "fail":
            listed = "; ".join(f"{e['path']}: {e['message']}" for e in errors)
            raise NodeError(f"{len(errors)} validation error(s): {listed}", code="validation-failed")
        return {"valid": not errors, "errors": errors}


Check = Callable[[Any], bool]
"""A compiled schema: True when the data is valid, False when it is not or may not be (a value that JSON
does not produce, like a Decimal where a number is bounded, is left to jsonschema)."""


class _Compiled(NamedTuple):
    """A schema's jsonschema validator, and its fast check when the schema is within the subset."""

    validator: Draft202012Validator
    fast: Check | None


def _compiled(schema: dict[str, Any]) -> _Compiled:
    return _Compiled(Draft202012Validator(schema), compile_check(schema))


_INLINE: dict[int, tuple[dict[str, Any], _Compiled]] = {}
"""Validators of inline schemas by the schema's identity: a config without templates is built once per
flow load, so its schema is the same dict on every run (the entry holds it, so its id is not reused)."""


def _validator_for(schema: dict[str, Any] | None, schema_file: str | None, flow_dir: Path) -> _Compiled:
    if schema is not None:
        found = _INLINE.get(id(schema))
        if found is None or found[0] is not schema:
            if len(_INLINE) >= 256:  # rendered schemas are new dicts each run: keep the cache bounded
                _INLINE.clear()
            found = _INLINE[id(schema)] = (schema, _compiled(schema))
        return found[1]
    path = (flow_dir / str(schema_file)).resolve()
    try:
        mtime_ns = path.stat().st_mtime_ns
    except OSError:
        mtime_ns = 0
    return _file_validator(flow_dir, str(schema_file), mtime_ns)


@lru_cache(maxsize=64)
def _file_validator(flow_dir: Path, name: str, mtime_ns: int) -> _Compiled:
    try:
        return _compiled(read_schema_file(flow_dir, name))
    except ValueError as exc:
        raise NodeError(str(exc), code="schema-file-invalid") from exc


# The fast check: a schema within the subset below compiled to nested closures, once per schema.

_ANNOTATIONS = frozenset(
    {"title", "description", "$comment", "default", "examples", "deprecated", "readOnly", "writeOnly"}
)
"""Keywords jsonschema ignores when validating, allowed in any schema of the subset."""
_ROOT_ONLY = frozenset({"$schema", "$id"})
"""Allowed at the root too, strings naming the dialect and the base URI: without ``$ref`` they change
nothing (the validator class is Draft202012Validator whatever ``$schema`` says)."""
_STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern"})
_NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_OBJECT_KEYWORDS = frozenset(
    {"required", "properties", "additionalProperties", "minProperties", "maxProperties", "dependentRequired"}
)
_ARRAY_KEYWORDS = frozenset({"items", "minItems", "maxItems"})
_SUBSET = (
    frozenset({"type", "enum", "const"}) | _STRING_KEYWORDS | _NUMBER_KEYWORDS | _OBJECT_KEYWORDS | _ARRAY_KEYWORDS
)
"""The keywords the fast check knows; a schema with any other (``$ref``, ``format``, ``anyOf``,
``patternProperties``, ``prefixItems``, ...) anywhere is left to jsonschema alone."""
_KNOWN = _SUBSET | _ANNOTATIONS


class _Unsupported(Exception):
    """The schema is outside the subset (or not a well-formed schema): no fast check."""


def compile_check(schema: object) -> Check | None:
    """The fast check of ``schema``, or None when the schema is outside the subset."""
    if isinstance(schema, dict):
        if not all(isinstance(schema[key], str) for key in _ROOT_ONLY & schema.keys()):
            return None
        schema = {key: value for key, value in schema.items() if key not in _ROOT_ONLY}
    try:
        return _schema_check(schema)
    except _Unsupported:
        return None


def _passes(fast: Check, data: Any) -> bool:
    """The fast check's verdict; anything it raises is jsonschema's to raise or answer."""
    try:
        return fast(data)
    except Exception:  # jsonschema runs next and behaves as it always did
        return False


def _schema_check(schema: object) -> Check:
    if schema is True:
        return _anything
    if schema is False:
        return _nothing
    if not isinstance(schema, dict) or not schema.keys() <= _KNOWN:
        raise _Unsupported
    kinds = _types(schema["type"]) if "type" in schema else None
    parts: list[Check] = []
    typed = False  # whether a part checks the type already
    for kind, applies_to, keywords, compile_part in _KINDS:
        if not keywords.isdisjoint(schema):
            alone = kinds == (kind,)  # the type is this kind alone: the part checks the type too
            part = compile_part(schema, not alone)
            # keywords of a kind the type rules out can never fail: leave them out of the check
            if kinds is None or not applies_to.isdisjoint(kinds):
                parts.append(part)
            typed = typed or alone
    if kinds is not None and not typed:
        parts.insert(0, _type_check(kinds))
    if "enum" in schema:
        parts.append(_enum_check(schema["enum"]))
    if "const" in schema:
        parts.append(_const_check(schema["const"]))
    return _all(parts)


def _anything(data: Any) -> bool:
    return True


def _nothing(data: Any) -> bool:
    return False


def _all(checks: list[Check]) -> Check:
    if not checks:
        return _anything
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda data: first(data) and second(data)
    return lambda data: all(check(data) for check in checks)


# `type`: jsonschema's draft 2020-12 type checker, value for value.


def _is_null(data: Any) -> bool:
    return data is None


def _is_boolean(data: Any) -> bool:
    return isinstance(data, bool)


def _is_string(data: Any) -> bool:
    return isinstance(data, str)


def _is_object(data: Any) -> bool:
    return isinstance(data, dict)


def _is_array(data: Any) -> bool:
    return isinstance(data, list)


def _is_number(data: Any) -> bool:
    """Any number but a bool (bool is an int in Python, not a number in JSON Schema)."""
    kind = type(data)
    return kind is int or kind is float or (kind is not bool and isinstance(data, numbers.Number))


def _is_integer(data: Any) -> bool:
    """An int but a bool, or a float with no fraction (1.0 is an integer in JSON Schema)."""
    if isinstance(data, bool):
        return False
    return isinstance(data, int) or (isinstance(data, float) and data.is_integer())


_TYPES: dict[str, Check] = {
    "null": _is_null,
    "boolean": _is_boolean,
    "string": _is_string,
    "number": _is_number,
    "integer": _is_integer,
    "object": _is_object,
    "array": _is_array,
}


def _types(value: object) -> tuple[str, ...]:
    kinds = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else ()
    if not kinds or not all(isinstance(kind, str) and kind in _TYPES for kind in kinds):
        raise _Unsupported
    return kinds


def _type_check(kinds: tuple[str, ...]) -> Check:
    if len(kinds) == 1:
        return _TYPES[kinds[0]]
    checks = tuple(_TYPES[kind] for kind in kinds)
    return lambda data: any(check(data) for check in checks)


# Keywords of one kind: each applies to values of its kind only, as in jsonschema.


def _bound(schema: dict[str, Any], keyword: str) -> int | float | None:
    """A bound on numbers, None when absent."""
    if keyword not in schema:
        return None
    value = schema[keyword]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Unsupported
    return value


def _count(schema: dict[str, Any], keyword: str, absent: float) -> float:
    """A bound on a length (a non-negative int), ``absent`` when absent (0 or infinity: no bound)."""
    if keyword not in schema:
        return absent
    value = schema[keyword]
    if type(value) is not int or value < 0:
        raise _Unsupported
    return value


def _string_check(schema: dict[str, Any], others: bool) -> Check:
    low, high = _count(schema, "minLength", 0), _count(schema, "maxLength", math.inf)
    search = _search(schema["pattern"]) if "pattern" in schema else None

    def check(data: Any) -> bool:
        # len counts code points, as jsonschema does; the pattern is searched for, not matched whole
        if not isinstance(data, str):
            return others
        return low <= len(data) <= high and (search is None or search(data) is not None)

    return check


def _search(pattern: object) -> Callable[[str], re.Match[str] | None]:
    """jsonschema runs ``re.search(pattern, data)``: the same pattern compiled once."""
    if not isinstance(pattern, str):
        raise _Unsupported
    try:
        return re.compile(pattern).search
    except re.error as exc:
        raise _Unsupported from exc


def _number_check(schema: dict[str, Any], others: bool) -> Check:
    # jsonschema's failing comparisons, negated as written: NaN fails none of them
    minimum, maximum = _bound(schema, "minimum"), _bound(schema, "maximum")
    above, below = _bound(schema, "exclusiveMinimum"), _bound(schema, "exclusiveMaximum")

    def check(data: Any) -> bool:
        kind = type(data)
        if kind is not int and kind is not float:
            # not a number (bool included): the bounds do not apply; another number: jsonschema's call
            return others and not _is_number(data)
        return (
            (minimum is None or not data < minimum)
            and (maximum is None or not data > maximum)
            and (above is None or not data <= above)
            and (below is None or not data >= below)
        )

    return check


def _object_check(schema: dict[str, Any], others: bool) -> Check:
    low, high = _count(schema, "minProperties", 0), _count(schema, "maxProperties", math.inf)
    required = _names(schema.get("required", []))
    declared = schema.get("properties", {})
    if not isinstance(declared, dict):
        raise _Unsupported
    compiled = ((name, _schema_check(sub)) for name, sub in declared.items())
    properties = tuple((name, sub) for name, sub in compiled if sub is not _anything)
    additional = _schema_check(schema.get("additionalProperties", True))
    dependencies = _dependencies(schema.get("dependentRequired", {}))

    def check(data: Any) -> bool:
        if not isinstance(data, dict):
            return others
        if not low <= len(data) <= high:
            return False
        for name in required:
            if name not in data:
                return False
        for name, sub in properties:
            if name in data and not sub(data[name]):
                return False
        if additional is not _anything:
            for key, value in data.items():
                if key not in declared and not additional(value):
                    return False
        return all(name not in data or all(each in data for each in needed) for name, needed in dependencies)

    return check


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise _Unsupported
    return tuple(value)


def _dependencies(value: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, dict):
        raise _Unsupported
    return tuple((name, _names(needed)) for name, needed in value.items())


def _array_check(schema: dict[str, Any], others: bool) -> Check:
    low, high = _count(schema, "minItems", 0), _count(schema, "maxItems", math.inf)
    items = _schema_check(schema.get("items", True))

    def check(data: Any) -> bool:
        if not isinstance(data, list):
            return others
        return low <= len(data) <= high and (items is _anything or all(items(item) for item in data))

    return check


_KINDS: tuple[tuple[str, frozenset[str], frozenset[str], Callable[[dict[str, Any], bool], Check]], ...] = (
    ("string", frozenset({"string"}), _STRING_KEYWORDS, _string_check),
    ("number", frozenset({"number", "integer"}), _NUMBER_KEYWORDS, _number_check),
    ("object", frozenset({"object"}), _OBJECT_KEYWORDS, _object_check),
    ("array", frozenset({"array"}), _ARRAY_KEYWORDS, _array_check),
)
"""Each kind of keyword: the type it is named for, the types it applies to, its keywords and their check,
given what to answer for data of another type (True; False where the schema's type is the kind alone)."""


# `enum` and `const`: jsonschema's equality, where 1 == 1.0 but True != 1, element by element.


def _enum_check(members: object) -> Check:
    if not isinstance(members, list):
        raise _Unsupported
    return lambda data: any(_equal(member, data) for member in members)


def _const_check(value: object) -> Check:
    return lambda data: _equal(data, value)


def _equal(one: Any, two: Any) -> bool:
    """``jsonschema._utils.equal``, written out (the argument order is jsonschema's too)."""
    if one is two:
        return True
    if isinstance(one, str) or isinstance(two, str):
        return bool(one == two)
    if isinstance(one, Sequence) and isinstance(two, Sequence):
        return len(one) == len(two) and all(_equal(i, j) for i, j in zip(one, two, strict=True))
    if isinstance(one, Mapping) and isinstance(two, Mapping):
        return len(one) == len(two) and all(key in two and _equal(value, two[key]) for key, value in one.items())
    return bool(_unbool(one) == _unbool(two))


_TRUE, _FALSE = object(), object()


def _unbool(value: Any) -> Any:
    return _TRUE if value is True else _FALSE if value is False else value
