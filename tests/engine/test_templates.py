"""flowchat.templates: native types, strict undefined, and the sandbox (statically and at run time)."""

from __future__ import annotations

import math
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import SecurityError

from flowchat import Execution, FlowInvalid, Registry, Runner, TemplateError, TemplateSecurityError, load_registry
from flowchat.errors import FlowChatError
from flowchat.loader import load_flow_text
from flowchat.secrets import Secrets
from flowchat.templates import ENVIRONMENT, Template, compile_expression, compile_template, render_tree

REPO = Path(__file__).resolve().parents[2]


def render(source: str, **context: Any) -> Any:
    return compile_template(source).render(context)


# --- native types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "context", "expected"),
    [
        ("{{ tags }}", {"tags": ["vip", "new"]}, ["vip", "new"]),
        ("{{ n + 1 }}", {"n": 41}, 42),
        ("{{ price * 2 }}", {"price": 1.25}, 2.5),
        ("{{ contact }}", {"contact": {"name": "Ana"}}, {"name": "Ana"}),
        ("{{ n > 1 }}", {"n": 2}, True),
        ("{{ nothing }}", {"nothing": None}, None),
        ("{{ tags | length }}", {"tags": ["a", "b"]}, 2),
    ],
)
def test_a_lone_expression_renders_its_native_value(source: str, context: dict[str, Any], expected: Any) -> None:
    value = render(source, **context)

    assert value == expected
    assert type(value) is type(expected)


def test_text_around_expressions_renders_a_string() -> None:
    assert render("{{ name }} has {{ n }} tags", name="Ana", n=2) == "Ana has 2 tags"
    assert render("tags: {{ tags }}", tags=["a"]) == "tags: ['a']"


@pytest.mark.parametrize(
    ("source", "context", "expected"),
    [
        ("+1{{ num }}", {"num": 5551234}, "+15551234"),
        ("{{ phone }}", {"phone": "+15551234"}, "+15551234"),
        ("{{ zip }}", {"zip": "01234"}, "01234"),
        ("{{ a }}{{ b }}", {"a": "1", "b": "2"}, "12"),
        ("{{ flag }}", {"flag": "true"}, "true"),
    ],
)
def test_strings_that_look_like_numbers_stay_strings(source: str, context: dict[str, Any], expected: str) -> None:
    assert render(source, **context) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [("{{ 41 + 1 }}", 42), ("{{ [1, 2] }}", [1, 2]), ("{{ false }}", False), ("{{ none }}", None)],
)
def test_a_constant_expression_renders_its_native_value(source: str, expected: Any) -> None:
    assert render(source) == expected


def test_a_constant_condition_is_a_bool() -> None:
    assert compile_expression("1 == 2").render({}) is False


def test_expressions_compile_bare_or_braced() -> None:
    bare, braced = compile_expression("lead.score >= 20"), compile_expression("{{ lead.score >= 20 }}")

    assert bare.render({"lead": {"score": 30}}) is True
    assert braced.render({"lead": {"score": 10}}) is False
    assert bare.names == braced.names == {"lead"}


def test_a_template_knows_the_top_level_names_it_reads() -> None:
    template = compile_template("{% for tag in lead.tags %}{{ tag }} {{ vars.brand }}{% endfor %}")

    assert template.names == {"lead", "vars"}


def test_render_tree_renders_every_template_inside_a_structure() -> None:
    tree = {"n": compile_template("{{ n }}"), "items": [compile_template("#{{ n }}"), 3], "plain": "text"}

    assert render_tree(tree, {"n": 7}) == {"n": 7, "items": ["#7", 3], "plain": "text"}


def test_syntax_errors_are_reported_when_compiling() -> None:
    with pytest.raises(TemplateError) as raised:
        compile_template("hi {{ name }")

    assert raised.value.code == "template-syntax"
    assert "hi {{ name }" in raised.value.message


# --- strict undefined -------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "missing"),
    [
        ("{{ missing }}", "missing"),
        ("hello {{ contact.name }}", "contact"),
        ("{{ trigger.nope }}", "nope"),
        ("{{ trigger.nope.deeper }}", "nope"),
        ("{{ trigger.n + other }}", "other"),
    ],
)
def test_an_undefined_name_fails_at_render_naming_the_expression(source: str, missing: str) -> None:
    template = compile_template(source)

    with pytest.raises(TemplateError) as raised:
        template.render({"trigger": {"n": 1}})

    assert raised.value.code == "template-undefined"
    assert missing in raised.value.message
    assert repr(source) in raised.value.message


@pytest.mark.parametrize("source", ["{{ [missing] }}", "{{ {'name': missing} }}"])
def test_an_undefined_name_inside_a_structure_fails_too(source: str) -> None:
    with pytest.raises(TemplateError):
        render(source)


# --- the sandbox ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "attribute"),
    [
        ("{{ ''.__class__.__mro__ }}", "__class__"),
        ("{{ cycler.__init__.__globals__ }}", "__init__"),
        ("{{ ''|attr('__class__') }}", "__class__"),
        ("{{ x['__class__'] }}", "__class__"),
        ("{{ lipsum.__globals__['os'] }}", "__globals__"),
        ("{% if x.__class__ %}yes{% endif %}", "__class__"),
    ],
)
def test_injection_is_refused_at_compile_time(source: str, attribute: str) -> None:
    with pytest.raises(TemplateSecurityError) as raised:
        compile_template(source)

    assert raised.value.code == "template-unsafe"
    assert isinstance(raised.value, TemplateError)
    assert attribute in raised.value.message


def test_injection_in_a_condition_is_refused_at_compile_time() -> None:
    with pytest.raises(TemplateSecurityError):
        compile_expression("trigger.__class__")


# The attribute name is built at run time, so the static check cannot see it.
DYNAMIC_INJECTIONS = [
    "{{ ''|attr('__cl' ~ 'ass__') }}",
    "{{ x['__cl' ~ 'ass__'] }}",
    "{{ x|attr(name) }}",
    "{{ x[name] }}",
    "{% set dunder = '_' * 2 %}{{ x|attr(dunder ~ 'class' ~ dunder) }}",
]


@pytest.mark.parametrize("source", DYNAMIC_INJECTIONS)
def test_the_sandbox_refuses_what_the_static_check_cannot_see(source: str) -> None:
    context = {"x": "text", "name": "__class__"}
    compile_template(source)  # passes the static check

    returned: Any = "nothing returned"
    with pytest.raises(SecurityError):
        returned = ENVIRONMENT.from_string(source).render(context)
    assert returned == "nothing returned"

    with pytest.raises(TemplateSecurityError) as raised:
        returned = compile_template(source).render(context)
    assert returned == "nothing returned"
    assert raised.value.code == "template-unsafe"
    assert "__class__" in raised.value.message


def test_the_sandbox_is_immutable() -> None:
    tags = ["vip"]

    with pytest.raises(TemplateSecurityError):
        render("{{ tags.append('hacked') }}", tags=tags)
    assert tags == ["vip"]


def test_only_harmless_globals_are_available() -> None:
    assert set(ENVIRONMENT.globals) <= {"range", "dict", "lipsum"}
    with pytest.raises(TemplateError) as raised:
        render("{{ cycler }}")
    assert raised.value.code == "template-undefined"


def test_private_attributes_through_filter_arguments_are_refused_at_compile_time() -> None:
    with pytest.raises(TemplateSecurityError):
        compile_template("{{ items|map(attribute='__class__')|list }}")


# --- through the runner -----------------------------------------------------------

UNDEFINED_AT_RUN_TIME = """\
flow: greet
trigger:
  type: webhook
nodes:
  - id: lead
    type: set
    with:
      values: {name: "{{ trigger.name }}"}
  - id: greet
    type: log
    with:
      message: "hello {{ lead.name }}, from {{ trigger.contact.city }}"
  - id: after
    type: log
    with:
      message: "done"
"""


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(plugins=REPO / "plugins", entry_points=False)


async def test_an_undefined_name_fails_the_node_with_its_id_and_expression(registry: Registry) -> None:
    flow = load_flow_text(UNDEFINED_AT_RUN_TIME, "greet.yaml", registry)

    execution = await Runner().run(flow, Execution.new(flow, {"name": "Ana"}))

    assert execution.status == "failed"
    assert execution.nodes["lead"].status == "ok"
    assert execution.nodes["lead"].output == {"name": "Ana"}
    assert execution.nodes["greet"].status == "failed"
    assert execution.nodes["after"].status == "pending"
    error = execution.error
    assert error is not None
    assert error["node"] == "greet"
    assert error["code"] == "template-undefined"
    assert error["location"]["node"] == "greet"
    assert "hello {{ lead.name }}, from {{ trigger.contact.city }}" in error["message"]
    assert "contact" in error["message"]


def test_a_flow_reading_a_name_nobody_defines_is_refused_at_load_time(registry: Registry) -> None:
    text = UNDEFINED_AT_RUN_TIME.replace("{{ lead.name }}", "{{ contact.name }}")

    with pytest.raises(FlowInvalid) as raised:
        load_flow_text(text, "greet.yaml", registry)

    assert [error.code for error in raised.value.errors] == ["template-unknown-name"]
    assert str(raised.value.errors[0]).startswith("greet.yaml:12:16: [template-unknown-name]")


# --- the subset rendered without Jinja gives exactly what Jinja gives -------------------

FAST_SOURCES = [
    "{{ trigger.From }}",
    "reply:{{ contact.phone }}",
    "{{ trigger['From'] }}",
    "{{ a['items'] }}",
    "{{ a.items }}",
    "{{ x.0 }}",
    "{{ x[-1] }}",
    "{{ x[5] }}",
    "{{ n }}!",
    "{{ trigger.Nope }}",
    "{{ trigger.ProfileName or 'friend' }}",
    "Thanks {{ trigger.ProfileName or 'friend' }}, hi",
    "{{ empty or 'friend' }}",
    "{{ ['inbound', 'new'] if trigger.contact.created else ['inbound'] }}",
    "{{ 'new' if not trigger.contact.created else 'returning' }}",
    "{{ trigger.contact.consent.state != 'opted_out' }}",
    "{{ 1 < n2 <= 3 }}",
    "{{ 'a' in trigger.From }}",
    "{{ 'z' not in x }}",
    "{{ text < 1 }}",
    "{{ trigger.From.upper }}",
    "{{ trigger.From[0] }}",
    "{{ flag and trigger.From }}",
    "{{ range }}",
    "{{ none }}",
    "{{ true }}",
    "{{ self or 'x' }}",  # Jinja's own name (the template), whatever the context holds
    "{{ 1e400 }}",  # Jinja's code spells it `inf`: a NameError
    "{{ [n2, 1e400] if flag else 1 }}",
]
FAST_CONTEXTS = [
    {
        "trigger": {
            "From": "whatsapp:+1",
            "ProfileName": "Ada",
            "contact": {"created": True, "consent": {"state": "unknown"}},
        },
        "contact": {"phone": "+2"},
        "a": {"items": 5},
        "x": [7, "z"],
        "n": None,
        "n2": 2,
        "empty": "",
        "text": "t",
        "flag": 0,
        "self": {},
    },
    {"trigger": {"From": "x", "contact": {"created": False, "consent": {"state": "opted_out"}}}, "x": [], "n2": 9},
]


@pytest.mark.parametrize("source", FAST_SOURCES)
def test_templates_rendered_without_jinja_match_jinja(source: str) -> None:
    template = compile_template(source)
    for context in FAST_CONTEXTS:
        slow = replace(template, _fast=None)
        assert _typed_outcome(template, context) == _typed_outcome(slow, context), (source, context)


def test_plain_lookups_and_conditions_take_the_fast_path() -> None:
    for source in ("{{ trigger.From }}", "x{{ a.b }}y", "{{ a or 'b' }}", "{{ [1] if a == 2 else [] }}",
                   "{{ a | truncate(100) }}", "{{ a | upper }}"):  # fmt: skip
        assert compile_template(source)._fast is not None, source
    for source in (
        "{{ a | map('upper') }}",
        "{{ a | join(',') }}",
        "{{ a + 1 }}",
        "{% if a %}x{% endif %}",
        "{{ range(3) }}",
        "{{ a.items }}",
    ):
        assert compile_template(source)._fast is None, source


def test_text_made_of_many_big_values_fails_before_it_is_built() -> None:
    template = compile_template("{{ body }}" * 200)
    assert template._fast is not None
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError) as raised:
            template.render({"body": "x" * 900_000})  # 180 MB of text if joined before it is measured
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert raised.value.code == "template-limit"
    assert "would be 1800000 long" in raised.value.message
    assert peak < 20_000_000


def test_a_constant_lookup_that_is_always_undefined_fails_at_load_time() -> None:
    with pytest.raises(TemplateError) as raised:
        compile_template("{{ 1 if 1.x else 2 }}")  # Jinja folds the constant test while compiling
    assert raised.value.code == "template-undefined"
    assert "'int object' has no attribute 'x'" in raised.value.message


# Random templates of the fast subset over random JSON-like contexts: the fast path and Jinja agree on
# the value (and its type), or on the error's code and message.
_KEYS = ["a", "b", "items", "keys", "get", "values", "pop", "0", "self", "loop"]
_NAMES = ["a", "b", "items", "self", "loop", "secrets", "caller", "none", "true", "range"]
_BIG = "y" * 600_000  # two of them in one text are over MAX_TEXT
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.integers(),
    st.floats(),  # NaN and infinities included
    st.sampled_from(["", "a", "abc", "0", "True", "é\x00", _BIG]),
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(_KEYS) | st.integers(-2, 2) | st.booleans(), inner, max_size=4)
    ),
    max_leaves=10,
)
_LITERALS = ["1", "0", "-1", "1.5", "0.0", "'a'", "''", "'items'", "true", "False", "none", "[]", "[1, 'a']", "1e400"]
_COMPARISONS = ["==", "!=", "<", "<=", ">", ">=", "in", "not in"]
_FILTERS = [
    "truncate(3)", "truncate(5, true)", "truncate(2, false, '~', 0)", "lower", "upper", "trim", "title", "capitalize",
    "length", "count", "string", "int", "float", "abs", "round", "round(1, 'floor')", "default('z')",
    "default('z', true)", "d(1)", "first", "last", "wordcount", "join(',')", "map('upper')", "truncate(a)",
]  # fmt: skip


def _bigger(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    key = st.sampled_from(_KEYS)
    return st.one_of(
        st.tuples(inner, key).map(lambda t: f"{t[0]}.{t[1]}" if t[1].isidentifier() else f"{t[0]}['{t[1]}']"),
        st.tuples(inner, key).map(lambda t: f"{t[0]}['{t[1]}']"),
        st.tuples(inner, st.integers(-2, 2)).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(inner, st.sampled_from(["or", "and"]), inner).map(" ".join).map("({})".format),
        inner.map("(not {})".format),
        st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        st.tuples(inner, st.lists(st.tuples(st.sampled_from(_COMPARISONS), inner), min_size=1, max_size=3)).map(
            lambda t: "(" + t[0] + "".join(f" {op} {operand}" for op, operand in t[1]) + ")"
        ),
        st.lists(inner, max_size=3).map(", ".join).map("[{}]".format),
        st.tuples(inner, st.sampled_from(_FILTERS)).map(lambda t: f"({t[0]} | {t[1]})"),
    )


_EXPRESSIONS = st.recursive(st.sampled_from(_NAMES + _LITERALS), _bigger, max_leaves=8)
_TEMPLATES = st.lists(
    _EXPRESSIONS.map("{{{{ {} }}}}".format) | st.sampled_from(["x", " ", "\n"]), min_size=1, max_size=4
)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    _TEMPLATES,
    st.dictionaries(st.sampled_from(_NAMES + _KEYS), _JSON, max_size=6),
    st.booleans(),
)
def test_random_templates_of_the_fast_subset_render_as_jinja_does(
    parts: list[str], context: dict[str, Any], text: bool
) -> None:
    source = "".join(parts)
    try:
        template = compile_template(source)
    except TemplateError:
        return
    if text:
        template = template.as_text()
    context["secrets"] = Secrets({"TOKEN": "s3cret"}).view
    assert _typed_outcome(template, context) == _typed_outcome(replace(template, _fast=None), context), source


def _typed_outcome(template: Template, context: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return "ok", _typed(template.render(context))
    except FlowChatError as exc:
        return type(exc).__name__, exc.code, exc.message


def _typed(value: Any) -> Any:
    """``value`` comparable with ``==`` as the same type and contents: 1, 1.0 and True differ, NaN equals NaN."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, list):
        return [_typed(item) for item in value]
    if isinstance(value, dict):
        return [(_typed(key), _typed(item)) for key, item in value.items()]
    if isinstance(value, str | int | float | bool | None):
        return type(value).__name__, value
    return type(value).__name__  # the secrets view, Jinja's objects


def test_an_if_without_else_that_is_false_renders_nothing() -> None:
    assert compile_template("{{ 'x' if flag }}").render({"flag": False}) is None
    assert compile_template("{{ 'x' if flag }}").render({"flag": True}) == "x"
    assert compile_template("a{{ 'x' if flag }}b").render({"flag": False}) == "ab"


def test_a_filter_that_finds_nothing_fails_as_jinja_does() -> None:
    for source in ("{{ a | first }}", "x{{ a | last }}", "{{ [a | first] }}"):
        with pytest.raises(TemplateError) as failed:
            compile_template(source).render({"a": []})
        assert failed.value.code == "template-undefined", source


def test_rounding_to_absurd_precision_is_refused_not_computed() -> None:
    for source in ("{{ n | round(p) }}", "{{ n | round(p, 'floor') }}"):
        with pytest.raises(TemplateError) as failed:
            compile_template(source).render({"n": 7, "p": -10_000_000})
        assert failed.value.code == "template-limit", source
    assert compile_template("{{ n | round(2) }}").render({"n": 1.2345}) == 1.23
