"""The ``validate`` node: JSON Schema checks with JSON paths, inline or from a file, and its fast check."""

import json
import math
import os
import re
import time
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from jsonschema import Draft202012Validator

import flowchat
from flowchat.nodes.validate import compile_check

PHONE = r"^\\+[1-9]\\d{7,14}$"  # as written in YAML double quotes: ^\+[1-9]\d{7,14}$


def validate_node(on_invalid: str = "fail") -> str:
    """A ``check`` node validating the trigger as a lead."""
    return f"""
    - id: check
      type: validate
      with:
        on_invalid: {on_invalid}
        schema:
          type: object
          required: [phone, name]
          properties:
            phone: {{type: string, pattern: "{PHONE}"}}
            name: {{type: string, minLength: 1}}
            age: {{type: integer, minimum: 0}}
    """


async def test_valid_data_outputs_valid_true_and_no_errors(run_flow):
    execution = await run_flow(validate_node(), {"phone": "+14155550123", "name": "Ann"})

    assert execution.status == "succeeded"
    assert execution.nodes["check"].output == {"valid": True, "errors": []}


async def test_invalid_data_fails_the_node_naming_the_json_path(run_flow):
    execution = await run_flow(validate_node("fail"), {"phone": "555", "name": "Ann"})

    assert execution.status == "failed"
    assert execution.error["node"] == "check"
    assert execution.error["code"] == "validation-failed"
    assert "$.phone" in execution.error["message"]
    assert execution.nodes["check"].attempts == 1


async def test_on_invalid_continue_outputs_errors_for_downstream_nodes(run_flow):
    branch = """
    - id: reject
      type: set
      when: "{{ not check.valid }}"
      with:
        values: {first_error: "{{ check.errors[0].path }}"}
    """
    execution = await run_flow(validate_node("continue") + branch, {"phone": "555", "name": "Ann"})

    assert execution.status == "succeeded"
    output = execution.nodes["check"].output
    assert output["valid"] is False
    assert [error["path"] for error in output["errors"]] == ["$.phone"]
    assert "does not match" in output["errors"][0]["message"]
    assert execution.nodes["reject"].output == {"first_error": "$.phone"}


async def test_every_error_is_reported_at_once(run_flow):
    trigger = {"phone": "555", "age": -3}  # bad phone, bad age, no name

    continued = await run_flow(validate_node("continue"), trigger)
    failed = await run_flow(validate_node("fail"), trigger)

    errors = continued.nodes["check"].output["errors"]
    assert [error["path"] for error in errors] == ["$", "$.age", "$.phone"]
    assert "'name' is a required property" in errors[0]["message"]
    message = failed.error["message"]
    assert message.startswith("3 validation error(s)")
    assert all(path in message for path in ("$.age", "$.phone", "'name' is a required property"))


async def test_data_selects_what_to_validate_and_nested_paths_are_reported(run_flow):
    nodes = """
    - id: check
      type: validate
      with:
        data: "{{ trigger.contact }}"
        on_invalid: continue
        schema:
          type: object
          properties:
            address:
              type: object
              properties: {zip: {type: string}}
    """
    execution = await run_flow(nodes, {"contact": {"address": {"zip": 94107}}})

    assert execution.nodes["check"].output["errors"][0]["path"] == "$.address.zip"


async def test_schema_file_is_read_relative_to_the_flow_file(run_flow, write_flow, tmp_path, monkeypatch):
    flows = tmp_path / "project" / "flows"
    (flows / "schemas").mkdir(parents=True)
    (flows / "schemas" / "lead.json").write_text(
        json.dumps({"type": "object", "required": ["phone"], "properties": {"phone": {"type": "string"}}})
    )
    path = write_flow(
        """
        - id: check
          type: validate
          with: {schema_file: schemas/lead.json, on_invalid: continue}
        """,
        folder=flows,
    )
    monkeypatch.chdir(tmp_path)  # not the flow's folder: the path must not depend on the cwd

    good = await run_flow(path, {"phone": "+14155550123"})
    bad = await run_flow(path, {"phone": 14155550123})

    assert good.nodes["check"].output == {"valid": True, "errors": []}
    assert bad.nodes["check"].output["errors"][0]["path"] == "$.phone"


def test_a_missing_schema_file_is_refused_when_the_flow_loads(write_flow, builtin_registry):
    path = write_flow(
        """
        - id: check
          type: validate
          with: {schema_file: nowhere.json}
        """
    )

    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, builtin_registry)

    [error] = caught.value.errors
    assert error.code == "schema-file-invalid"
    assert "nowhere.json" in error.message


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/etc/passwd", "outside the flow's folder"),
        ("../../etc/passwd", "outside the flow's folder"),
        ("/dev/zero", "outside the flow's folder"),
        ("fifo.json", "not a regular file"),
        ("link.json", "outside the flow's folder"),
        ("big.json", "over the limit"),
        ("{{ trigger.schema }}", "may not be a template"),
    ],
)
def test_schema_file_is_confined_to_the_flow_folder_and_read_at_load_time(write_flow, builtin_registry, name, why):
    path = write_flow(
        f"""
        - id: check
          type: validate
          with: {{schema_file: "{name}"}}
        """
    )
    os.mkfifo(path.parent / "fifo.json")
    (path.parent / "link.json").symlink_to("/etc/hostname")
    (path.parent / "big.json").write_text('{"description": "' + "x" * (1024 * 1024) + '"}')

    started = time.monotonic()
    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, builtin_registry)

    assert time.monotonic() - started < 2
    [error] = caught.value.errors
    assert (error.code, error.location.line) == ("schema-file-invalid", 7)
    assert why in error.message


def test_an_invalid_inline_schema_is_refused_when_the_flow_loads(write_flow, builtin_registry):
    path = write_flow(
        """
        - id: check
          type: validate
          with: {schema: {type: 12}}
        """
    )

    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, builtin_registry)

    (problem,) = caught.value.errors
    assert problem.code == "invalid-value"
    assert "not a valid JSON Schema" in problem.message
    assert problem.location.file == str(path)
    assert problem.location.line == 7


def test_exactly_one_of_schema_and_schema_file_is_required(write_flow, builtin_registry):
    path = write_flow(
        """
        - id: check
          type: validate
          with: {on_invalid: continue}
        """
    )

    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, builtin_registry)

    assert "exactly one of schema or schema_file" in str(caught.value)


# The fast check: for schemas in its subset it answers exactly as jsonschema's is_valid.

CRM_CHECK = {
    "type": "object",
    "required": ["From", "Body"],
    "properties": {"From": {"type": "string", "minLength": 1}, "Body": {"type": "string", "minLength": 1, "maxLength": 4096}},
}  # fmt: skip

KEYS = ["a", "b", "From", "Body", "é", "🙂"]
TYPES = ["null", "boolean", "string", "number", "integer", "object", "array"]
PATTERNS = ["^a", "b$", r"\d", "^[a-z]*$", "é", "^$", ".", r"^\+[1-9]\d{2,4}$", "🙂|x"]
EDGES = [0, 1, -1, 2, 1.0, 0.0, -0.0, 1.5, -2.5, 2**64, 2.0**64, math.nan, math.inf, -math.inf, True, False, None]
EDGES += ["", "a", "1", "é", "🙂", "a🙂b"]

scalars = st.one_of(
    st.sampled_from(EDGES),
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.integers(),
    st.floats(),  # NaN and the infinities too: Python's json reads them
    st.text(max_size=6),
)
json_data = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
counts = st.integers(0, 4)
bounds = (
    st.integers(-3, 3)
    | st.sampled_from([0.5, -1.5, 1.0, 2**64, 2.0**64, math.inf, -math.inf])
    | st.floats(allow_nan=False)
)
names = st.lists(st.sampled_from(KEYS), unique=True, max_size=3)


KIND_KEYWORDS = {
    "null": [], "boolean": [],
    "string": ["minLength", "maxLength", "pattern"],
    "number": ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"],
    "integer": ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"],
    "object": ["required", "properties", "additionalProperties", "minProperties", "maxProperties", "dependentRequired"],
    "array": ["items", "minItems", "maxItems"],
}  # fmt: skip


def schema_of(inner: SearchStrategy[Any]) -> SearchStrategy[dict[str, Any]]:
    """Schemas of the subset as flows write them: usually a type and a few of its keywords (now and then
    one of another type's), subschemas drawn from ``inner``."""
    keywords = {
        "minLength": counts, "maxLength": counts, "pattern": st.sampled_from(PATTERNS),
        "minimum": bounds, "maximum": bounds, "exclusiveMinimum": bounds, "exclusiveMaximum": bounds,
        "required": names, "properties": st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
        "additionalProperties": inner, "minProperties": counts, "maxProperties": counts,
        "dependentRequired": st.dictionaries(st.sampled_from(KEYS), names, max_size=2),
        "items": inner, "minItems": counts, "maxItems": counts,
        "enum": st.lists(json_data, min_size=1, max_size=4), "const": json_data,
        "title": st.text(max_size=3), "default": json_data,
    }  # fmt: skip

    def typed(kinds: list[str]) -> SearchStrategy[dict[str, Any]]:
        likely = sorted({name for kind in kinds for name in KIND_KEYWORDS[kind]}) or sorted(keywords)
        chosen = st.builds(
            set.union,
            st.sets(st.sampled_from(likely), max_size=4),
            st.sets(st.sampled_from(sorted(keywords)), max_size=1),
        )
        type_ = {} if not kinds else {"type": st.just(kinds[0] if len(kinds) == 1 else kinds)}
        return chosen.flatmap(
            lambda names: st.fixed_dictionaries({**type_, **{name: keywords[name] for name in sorted(names)}})
        )

    one_type = st.sampled_from(TYPES).map(lambda kind: [kind])
    records = st.fixed_dictionaries(  # like the CRM's: declared properties, some required, maybe no others
        {
            "type": st.just("object"),
            "properties": st.dictionaries(st.sampled_from(KEYS), inner, min_size=1, max_size=3),
        },
        optional={name: keywords[name] for name in KIND_KEYWORDS["object"] if name != "properties"},
    )
    lists = st.fixed_dictionaries(
        {"type": st.just("array"), "items": inner}, optional={"minItems": counts, "maxItems": counts}
    )
    return (one_type | st.lists(st.sampled_from(TYPES), max_size=3, unique=True)).flatmap(typed) | records | lists


subschemas = st.recursive(st.booleans() | schema_of(st.booleans()), schema_of, max_leaves=3)
schemas = st.builds(
    lambda schema, root: {**root, **schema},
    schema_of(subschemas),
    st.fixed_dictionaries(
        {},
        optional={
            "$schema": st.sampled_from(
                ["https://json-schema.org/draft/2020-12/schema", "http://json-schema.org/draft-04/schema#"]
            ),
            "$id": st.just("https://example.com/lead.json"),
        },
    ),
)


def variants(value: Any) -> list[Any]:
    """``value`` and its look-alikes under Python's ==: 1, 1.0 and True; 0, -0.0 and False."""
    if isinstance(value, bool):
        return [value, int(value), float(value), [value]]
    if not isinstance(value, int | float) or math.isnan(value) or math.isinf(value):
        return [value, [value]]
    alike: list[Any] = [value, float(value)]
    if value == int(value):
        alike.append(int(value))
    if value in (0, 1):
        alike.append(bool(value))
    return alike


def instances(schema: Any) -> SearchStrategy[Any]:
    """Data shaped by ``schema``: often valid, often just off (a bound, a type, a key), or any JSON."""
    if not isinstance(schema, dict):
        return json_data
    kinds = schema.get("type", TYPES)
    shapes = [shaped(schema, kind) for kind in ([kinds] if isinstance(kinds, str) else kinds)]
    options = [json_data, *shapes * 3]  # shaped data three times as likely as any JSON
    for member in schema.get("enum", []) + ([schema["const"]] if "const" in schema else []):
        options.append(st.sampled_from(variants(member)))
    return st.one_of(options)


def shaped(schema: dict[str, Any], kind: str) -> SearchStrategy[Any]:
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength", 6)
        texts = st.text(min_size=max(low - 1, 0), max_size=max(high + 1, low))
        return texts | st.from_regex(schema["pattern"]) if "pattern" in schema else texts
    if kind in ("number", "integer"):
        near = [schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema]
        edges = [v + d for v in near if not math.isinf(v) for d in (-1, -0.5, 0, 0.5, 1)] + near
        return st.sampled_from([edge for value in [*edges, 0, 1, math.nan, math.inf] for edge in variants(value)])
    if kind == "object":
        properties = schema.get("properties", {})
        required = {name: instances(properties.get(name, True)) for name in schema.get("required", [])}
        optional = {name: instances(sub) for name, sub in properties.items() if name not in required}
        extra = st.dictionaries(st.sampled_from(KEYS), instances(schema.get("additionalProperties", True)), max_size=2)
        return st.builds(
            lambda extra, known: {**extra, **known}, extra, st.fixed_dictionaries(required, optional=optional)
        )
    if kind == "array":
        low, high = schema.get("minItems", 0), schema.get("maxItems", 4)
        return st.lists(instances(schema.get("items", True)), min_size=max(low - 1, 0), max_size=max(high + 1, low))
    return st.sampled_from({"null": [None], "boolean": [True, False, 0, 1, 1.0]}[kind])


@settings(max_examples=1000, deadline=None)
@given(schemas, st.data())
def test_the_fast_check_answers_as_jsonschema_does(schema, data):
    Draft202012Validator.check_schema(schema)  # the schemas drawn are valid ones, as a flow's must be
    check = compile_check(schema)
    validator = Draft202012Validator(schema)
    assert check is not None

    shaped_data = instances(schema)
    for _ in range(4):
        instance = data.draw(shaped_data)
        assert check(instance) == validator.is_valid(instance), instance


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", list: "array", dict: "object"}[type(value)]


def near(number: float) -> list[Any]:
    """Bounds at, just below and just above ``number`` (as int, float and, for 0 and 1, bool look-alikes)."""
    if math.isnan(number) or math.isinf(number):
        return [number, 0, -1.5]
    return [edge for step in (-1, -0.5, 0, 0.5, 1) for edge in variants(number + step)]


def patterns_in(text: str) -> list[str]:
    """Patterns ``text`` contains, anchored or not (``re.search`` finds the first kind, ``re.match`` may not)."""
    inner, first, last = re.escape(text[1:]), re.escape(text[:1]), re.escape(text[-1:])
    return [inner, f"^{inner}", f"{first}$", f"{last}$", f"^{re.escape(text)}$", *PATTERNS]


def fitted(value: Any) -> SearchStrategy[dict[str, Any]]:
    """Schemas drawn around ``value``: its type or a look-alike's, bounds at its edges, its keys declared and
    required or not, ``enum``/``const`` of look-alikes, so the value passes about as often as it fails."""
    kind = kind_of(value)
    types = st.sampled_from(
        [kind, [kind, "boolean" if kind == "null" else "null"], "number" if kind == "integer" else "integer", "number"]
    )
    optional: dict[str, SearchStrategy[Any]] = {
        "enum": st.lists(st.sampled_from(variants(value)) | json_data, min_size=1, max_size=3),
        "const": st.sampled_from(variants(value)),
    }
    if kind == "string":
        lengths = st.sampled_from([len(value) - 1, len(value), len(value) + 1]).filter(lambda n: n >= 0)
        optional |= {"minLength": lengths, "maxLength": lengths, "pattern": st.sampled_from(patterns_in(value))}
    elif kind in ("integer", "number"):
        edges = st.sampled_from(near(value)).filter(lambda edge: not isinstance(edge, bool))
        optional |= dict.fromkeys(KIND_KEYWORDS["number"], edges)
    elif kind == "array":
        sizes = st.sampled_from([len(value) - 1, len(value), len(value) + 1]).filter(lambda n: n >= 0)
        items = fitted(value[-1]) if value else subschemas
        optional |= {"items": items | st.booleans(), "minItems": sizes, "maxItems": sizes}
    elif kind == "object":
        sizes = st.sampled_from([len(value) - 1, len(value), len(value) + 1]).filter(lambda n: n >= 0)
        keys = st.sampled_from([*value, *KEYS])
        declared = {key: fitted(item) for key, item in value.items()}
        optional |= {
            "properties": st.fixed_dictionaries(declared) | st.fixed_dictionaries({}, optional=declared),
            "required": st.lists(keys, unique=True, max_size=3),
            "additionalProperties": st.booleans() | (fitted(next(iter(value.values()))) if value else subschemas),
            "minProperties": sizes, "maxProperties": sizes,
            "dependentRequired": st.dictionaries(keys, st.lists(keys, unique=True, max_size=2), max_size=2),
        }  # fmt: skip
    chosen = st.sets(st.sampled_from(sorted(optional)), max_size=3)
    return chosen.flatmap(
        lambda names: st.fixed_dictionaries({name: optional[name] for name in sorted(names)}, optional={"type": types})
    )


@settings(max_examples=1000, deadline=None)
@given(json_data.flatmap(lambda value: st.tuples(st.just(value), fitted(value))))
def test_the_fast_check_answers_as_jsonschema_does_at_the_edges(value_and_schema):
    value, schema = value_and_schema
    Draft202012Validator.check_schema(schema)
    check = compile_check(schema)

    assert check is not None
    assert check(value) == Draft202012Validator(schema).is_valid(value)


@pytest.mark.parametrize(
    ("schema", "instance", "valid"),
    [
        (CRM_CHECK, {"From": "whatsapp:+5511987654321", "Body": "Oi", "ProfileName": "Ana"}, True),
        (CRM_CHECK, {"From": "whatsapp:+5511987654321"}, False),
        (CRM_CHECK, {"From": "whatsapp:+5511987654321", "Body": ""}, False),
        (CRM_CHECK, {"From": 5511987654321, "Body": "Oi"}, False),
        (CRM_CHECK, ["From", "Body"], False),
        ({"type": "integer"}, 1.0, True),
        ({"type": "integer"}, 1.5, False),
        ({"type": "integer"}, True, False),
        ({"type": "number"}, False, False),
        ({"type": ["boolean", "null"]}, 0, False),
        ({"enum": [1]}, 1.0, True),
        ({"enum": [1]}, True, False),
        ({"const": [0, {"a": False}]}, [0.0, {"a": False}], True),
        ({"const": [0, {"a": False}]}, [False, {"a": 0}], False),
        ({"enum": [math.nan]}, math.nan, True),  # the same object: equal by identity
        ({"const": math.nan}, float("nan"), False),
        ({"minLength": 2, "maxLength": 2}, "🙂é", True),  # code points, not UTF-16 units or bytes
        ({"maxLength": 1}, "🙂", True),
        ({"pattern": "b"}, "abc", True),  # searched for anywhere, as re.search does
        ({"pattern": "^b"}, "abc", False),
        ({"minimum": 0}, "-1", True),  # bounds apply to numbers only
        ({"exclusiveMaximum": 1}, 1.0, False),
        ({"minimum": 0}, math.nan, True),
        ({"properties": {"a": {"type": "string"}}, "additionalProperties": False}, {"a": "x"}, True),
        ({"properties": {"a": {"type": "string"}}, "additionalProperties": False}, {"a": "x", "b": 1}, False),
        ({"properties": {"a": False}}, {"b": 1}, True),
        ({"additionalProperties": {"type": "integer"}}, {"a": 1, "b": 2.0}, True),
        ({"dependentRequired": {"a": ["b"]}}, {"a": 1}, False),
        ({"items": {"type": "string"}, "minItems": 1}, ["a", 1], False),
        ({"type": "string", "minimum": 3}, "x", True),
        ({"title": "Lead", "$schema": "http://json-schema.org/draft-04/schema#", "type": "integer"}, 1.0, True),
    ],
)
def test_the_fast_check_on_edge_cases(schema, instance, valid):
    check = compile_check(schema)

    assert check is not None
    assert check(instance) is valid
    assert Draft202012Validator(schema).is_valid(instance) is valid


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/$defs/lead", "$defs": {"lead": {"type": "object"}}},
        {"type": "string", "format": "email"},
        {"anyOf": [{"type": "string"}, {"type": "null"}]},
        {"not": {"type": "string"}},
        {"properties": {"a": {"oneOf": [{"minimum": 1}]}}},
        {"items": {"items": {"uniqueItems": True}}},
        {"additionalProperties": {"multipleOf": 2}},
        {"patternProperties": {"^x-": {"type": "string"}}},
        {"prefixItems": [{"type": "string"}]},
        {"type": "object", "unevaluatedProperties": False},
        {"propertyNames": {"maxLength": 3}},
        {"properties": {"a": {"$id": "https://example.com/a", "type": "string"}}},  # only at the root
        {"$id": 12, "type": "string"},
        {"type": "string", "x-flowchat-hint": 1},  # unknown keywords too
        {"type": "string", "pattern": "["},  # and what jsonschema could not run
        {"type": "money"},
        {"minLength": 1.0},
    ],
)
def test_schemas_outside_the_subset_have_no_fast_check(schema):
    assert compile_check(schema) is None


def test_numbers_json_does_not_produce_are_left_to_jsonschema():
    check = compile_check({"minimum": 0})

    assert check is not None
    assert check(Decimal("1")) is False  # not "invalid": "ask jsonschema"
    assert check(1) is True


async def test_valid_data_is_answered_without_jsonschema(run_flow, monkeypatch):
    calls = []
    iter_errors = Draft202012Validator.iter_errors

    def counted(self, instance):
        if isinstance(instance, dict) and "ProfileName" in instance:  # the trigger, not a schema being checked
            calls.append(self.schema)
        return iter_errors(self, instance)

    monkeypatch.setattr(Draft202012Validator, "iter_errors", counted)
    nodes = f"""
    - id: check
      type: validate
      with: {{on_invalid: continue, schema: {json.dumps(CRM_CHECK)}}}
    - id: loose
      type: validate
      with: {{on_invalid: continue, schema: {{anyOf: [{{type: object}}, {{type: string}}]}}}}
    """

    good = await run_flow(nodes, {"From": "whatsapp:+5511987654321", "Body": "Oi", "ProfileName": "Ana"})
    assert good.nodes["check"].output == good.nodes["loose"].output == {"valid": True, "errors": []}
    assert calls == [{"anyOf": [{"type": "object"}, {"type": "string"}]}]  # outside the subset

    bad = await run_flow(nodes, {"From": "whatsapp:+5511987654321", "Body": ""})
    assert bad.nodes["check"].output == {
        "valid": False,
        "errors": [{"path": "$.Body", "message": "'' should be non-empty"}],
    }
