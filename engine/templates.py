"""Jinja2 templates in a sandbox, with native types.

``"{{ contact.tags }}"`` renders the list itself and ``"{{ n + 1 }}"`` an int;
a string with text around its expressions renders as a string. Templates are
compiled once when a flow loads; rendering an undefined name fails loudly and
names the expression. Anything reaching for private attributes
(``''.__class__``) is refused at load time and again by the sandbox at run time.
"""

from __future__ import annotations

import difflib
import functools
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.nativetypes import NativeCodeGenerator

from flowchat.errors import FlowChatError, TemplateError, TemplateSecurityError
from flowchat.sandbox import (
    INTERCEPTED_BINOPS,
    BoundedSandbox,
    TemplateLimitExceeded,
    bounded_lipsum,
    bounded_range,
    check_binop,
    check_lipsum,
    check_text,
    end_budget,
    guard_filters,
    spend,
    start_budget,
)

CONTEXT_NAMES = frozenset({"trigger", "vars", "flow", "execution", "secrets"})
"""Names every template may use besides upstream node ids."""
RESERVED_NAMES = CONTEXT_NAMES | {"secrets"}
"""Names of the template context: a node id may not shadow them."""

_SAFE_GLOBALS = ("range", "dict", "lipsum")


def _concat(values: Iterable[Any]) -> Any:
    parts: list[Any] = []
    size = 0
    for part in map(_materialise, values):  # consumed one by one: a loop that outputs is bounded as it runs
        spend()
        _refuse_undefined(part)
        parts.append(part)
        if isinstance(part, str):
            size += len(part)
            check_text(size)
    if len(parts) == 1:
        return parts[0]
    texts = [str(part) for part in parts]
    check_text(sum(map(len, texts)))
    return "".join(texts)


def _materialise(value: Any) -> Any:
    """Generators (``map``, ``select``, ``unique`` …) become lists: no lazy value reaches a node or an output."""
    if isinstance(value, Iterator):
        return [_materialise(item) for item in value]
    if isinstance(value, list | tuple) and any(isinstance(item, Iterator) for item in value):
        return [_materialise(item) for item in value]
    return value


def _refuse_undefined(value: Any) -> None:
    """StrictUndefined raises when turned into text, naming what was missing."""
    if isinstance(value, jinja2.Undefined):
        str(value)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_undefined(item)
    elif isinstance(value, dict):
        for item in value.values():
            _refuse_undefined(item)


class _CodeGenerator(NativeCodeGenerator):
    """Keeps constant-only expressions native: ``{{ 41 + 1 }}`` is 42, ``{{ false }}`` False."""

    def _output_const_repr(self, group: Iterable[Any]) -> str:
        values = list(group)
        if len(values) == 1:
            return repr(values[0])
        return repr("".join(str(value) for value in values))


class _NativeSandbox(BoundedSandbox):
    code_generator_class = _CodeGenerator
    concat = staticmethod(_concat)


class _NativeTemplate(jinja2.Template):
    environment_class = _NativeSandbox

    def render(self, *args: Any, **kwargs: Any) -> Any:
        # the globals merged by hand: Jinja's own merge walks its ChainMap of globals on every render
        context = self.new_context({**_GLOBALS, **dict(*args, **kwargs)}, shared=True)
        return _concat(self.root_render_func(context))


_NativeSandbox.template_class = _NativeTemplate


def _environment() -> _NativeSandbox:
    env = _NativeSandbox(undefined=jinja2.StrictUndefined, autoescape=False)
    env.globals = {name: env.globals[name] for name in _SAFE_GLOBALS if name in env.globals}
    env.globals["range"] = bounded_range
    env.globals["lipsum"] = bounded_lipsum(env.globals["lipsum"])  # type: ignore[arg-type]
    guard_filters(env.filters)
    return env


ENVIRONMENT = _environment()
_GLOBALS = dict(ENVIRONMENT.globals)


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


@dataclass(frozen=True, slots=True)
class Template:
    """One compiled template string, the top-level names it reads and the ``vars`` keys it names.

    ``text`` marks a template rendered into a string-typed config field: a number it
    renders becomes its string (``message: "{{ n.score }}"``).
    """

    source: str
    names: frozenset[str]
    _compiled: jinja2.Template
    var_keys: frozenset[str] = frozenset()
    text: bool = False
    _lookups: tuple[Literal | Lookup, ...] | None = None
    """The template as literal text and plain lookups (``"reply:{{ contact.phone }}"``), when it is only that."""

    def render(self, context: dict[str, Any]) -> Any:
        budget = start_budget()
        try:
            result = _look_up(self._lookups, context) if self._lookups else _MISSING
            if result is _MISSING:
                result = self._compiled.render(context)
        except TemplateLimitExceeded as exc:
            raise TemplateError(f"{exc} in {_short(self.source)}", code="template-limit") from exc
        except SecurityError as exc:
            raise TemplateSecurityError(f"{exc} in {self.source!r}") from exc
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"{exc} in {self.source!r}", code="template-undefined") from exc
        except FlowChatError:
            raise  # raised on purpose by something the context holds (a missing secret): keep its code
        except (MemoryError, RecursionError) as exc:
            raise TemplateError(f"{type(exc).__name__} in {_short(self.source)}", code="template-limit") from exc
        except Exception as exc:  # a filter or operator failing on the data: that node's error, not a crash
            raise TemplateError(f"{type(exc).__name__}: {exc} in {self.source!r}") from exc
        finally:
            end_budget(budget)
        if self.text and isinstance(result, int | float) and not isinstance(result, bool):
            return str(result)
        return result

    def as_text(self) -> Template:
        """This template, rendering numbers as strings."""
        return Template(self.source, self.names, self._compiled, self.var_keys, True, self._lookups)


class Literal(str):
    """Text between the expressions of a template."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """``contact.phone`` or ``trigger['From']``: a context name followed by keys."""

    name: str
    keys: tuple[str | int, ...]


_MISSING: Any = object()
_DICT_ATTRIBUTES = frozenset(dir(dict))
"""``x.items`` is dict.items in Jinja, not the key "items": such lookups take Jinja's path."""


def _look_up(parts: tuple[Literal | Lookup, ...], context: dict[str, Any]) -> Any:
    """Render a template of plain lookups without Jinja; ``_MISSING`` when Jinja must decide.

    Only dicts and lists of the context are walked, exactly as Jinja's sandbox would for
    these keys; anything else (a missing key, an attribute, the secrets view) goes to Jinja,
    which renders it or raises its usual error.
    """
    values: list[Any] = []
    for part in parts:
        if isinstance(part, Literal):
            values.append(part)
            continue
        value = context.get(part.name, _MISSING)
        for key in part.keys:
            if type(value) is dict:
                value = value.get(key, _MISSING)
            elif type(value) is list and type(key) is int and -len(value) <= key < len(value):
                value = value[key]
            else:
                return _MISSING
        if value is _MISSING or isinstance(value, Iterator):
            return _MISSING
        values.append(value)
    if len(values) == 1:
        if isinstance(values[0], str):
            check_text(len(values[0]))
        return values[0]
    text = "".join(str(value) for value in values)
    check_text(len(text))
    return text


def _lookups_of(tree: nodes.Template) -> tuple[Literal | Lookup, ...] | None:
    """The template as literals and lookups, or None when it holds anything else."""
    if len(tree.body) != 1 or not isinstance(tree.body[0], nodes.Output):
        return None
    parts: list[Literal | Lookup] = []
    for child in tree.body[0].nodes:
        if isinstance(child, nodes.TemplateData):
            parts.append(Literal(child.data))
            continue
        lookup = _lookup_of(child)
        if lookup is None:
            return None
        parts.append(lookup)
    return tuple(parts) if parts else None


def _lookup_of(node: nodes.Node) -> Lookup | None:
    keys: list[str | int] = []
    while not isinstance(node, nodes.Name):
        if isinstance(node, nodes.Getattr) and node.attr not in _DICT_ATTRIBUTES:
            keys.append(node.attr)
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and type(node.arg.value) in (str, int):
            keys.append(node.arg.value)  # a subscript is the key first in Jinja, even ['items']
        else:
            return None
        node = node.node
    if node.ctx != "load" or node.name in _GLOBALS:
        return None
    return Lookup(node.name, tuple(reversed(keys)))


def _short(source: str) -> str:
    return repr(source if len(source) <= 80 else source[:77] + "...")


@functools.lru_cache(maxsize=4096)  # reloads compile the same strings again; bounded, Templates are immutable
def compile_template(source: str) -> Template:
    """Compile ``source``; raise TemplateError (syntax, unknown filter/test, limit) or TemplateSecurityError."""
    try:
        tree = ENVIRONMENT.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax: {exc.message} in {source!r}", code="template-syntax") from exc
    except RecursionError as exc:
        raise TemplateError(f"template nested too deeply in {_short(source)}", code="template-limit") from exc
    unsafe = next(_unsafe_accesses(tree), None)
    if unsafe is not None:
        raise TemplateSecurityError(f"access to {unsafe!r} is not allowed in {source!r}")
    _check_known(tree, source)
    _check_constants(tree, source)
    names = frozenset(meta.find_undeclared_variables(tree))
    try:
        compiled = ENVIRONMENT.from_string(tree)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template: {exc} in {source!r}", code="template-syntax") from exc
    except RecursionError as exc:
        raise TemplateError(f"template nested too deeply in {_short(source)}", code="template-limit") from exc
    return Template(source, names, compiled, frozenset(_var_keys(tree)), _lookups=_lookups_of(tree))


def _check_known(tree: nodes.Node, source: str) -> None:
    """Unknown filters and tests are load-time problems (Jinja would fail only when rendering)."""
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        kind, known = ("filter", ENVIRONMENT.filters) if isinstance(node, nodes.Filter) else ("test", ENVIRONMENT.tests)
        if node.name not in known:
            matches = difflib.get_close_matches(node.name, list(known), n=1, cutoff=0.6)
            hint = f" (did you mean {matches[0]!r}?)" if matches else ""
            raise TemplateError(f"unknown {kind} {node.name!r} in {source!r}{hint}", code=f"template-unknown-{kind}")


def _var_keys(tree: nodes.Node) -> Iterator[str]:
    """The keys read from ``vars`` by name: ``vars.region``, ``vars['region']``."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if not (isinstance(node, nodes.Getattr | nodes.Getitem) and isinstance(node.node, nodes.Name)):
            continue
        if node.node.name != "vars":
            continue
        if isinstance(node, nodes.Getattr):
            yield node.attr
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            yield node.arg.value


# --- constants over the limits are load-time problems -----------------------------------

_BINARY: dict[type[nodes.BinExpr], Callable[[Any, Any], Any]] = {
    nodes.Add: operator.add,
    nodes.Sub: operator.sub,
    nodes.Mul: operator.mul,
    nodes.Pow: operator.pow,
    nodes.Mod: operator.mod,
    nodes.FloorDiv: operator.floordiv,
    nodes.Div: operator.truediv,
}
_SYMBOL: dict[type[nodes.BinExpr], str] = {nodes.Mul: "*", nodes.Pow: "**", nodes.Mod: "%"}


class _NotConstant(Exception):
    pass


def _check_constants(tree: nodes.Node, source: str) -> None:
    """Evaluate constant arithmetic with the run-time limits, so over-limit constants fail at load time."""
    for node in tree.find_all((nodes.BinExpr, nodes.Call)):
        try:
            if isinstance(node, nodes.Call):
                _constant_call(node)
            else:
                _constant(node)
        except TemplateLimitExceeded as exc:
            raise TemplateError(f"{exc} in {_short(source)}", code="template-limit") from exc
        except (_NotConstant, ArithmeticError, TypeError, ValueError, RecursionError):
            continue


def _constant(node: nodes.Node) -> Any:
    if isinstance(node, nodes.Const):
        return node.value
    if isinstance(node, nodes.Neg | nodes.Pos):
        value = _constant(node.node)
        return -value if isinstance(node, nodes.Neg) else value
    if isinstance(node, nodes.List | nodes.Tuple):
        return [_constant(item) for item in node.items]
    if not isinstance(node, nodes.BinExpr) or type(node) not in _BINARY:
        raise _NotConstant
    compute = _BINARY[type(node)]
    left, right = _constant(node.left), _constant(node.right)
    symbol = _SYMBOL.get(type(node))
    if symbol in INTERCEPTED_BINOPS:
        check_binop(symbol, left, right)
    return compute(left, right)


def _constant_call(node: nodes.Call) -> None:
    if not (isinstance(node.node, nodes.Name) and node.node.name in ("range", "lipsum")):
        return
    args = [_constant(arg) for arg in node.args]
    kwargs = {keyword.key: _constant(keyword.value) for keyword in node.kwargs}
    if node.node.name == "range":
        bounded_range(*args)
    else:
        check_lipsum(*args, **kwargs)


def compile_expression(source: str) -> Template:
    """Compile a condition: ``contact.created`` or ``{{ contact.created }}``."""
    return compile_template(source if is_template(source) else f"{{{{ {source} }}}}")


def _unsafe_accesses(tree: nodes.Node) -> Iterator[str]:
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Name, nodes.Filter, nodes.Test, nodes.Call)):
        name: Any
        if isinstance(node, nodes.Filter | nodes.Test | nodes.Call):
            # attr('__class__'), map(attribute='__class__'), sort(attribute=…) and friends
            arguments = [*node.args, *(keyword.value for keyword in node.kwargs)]
            yield from (a.value for a in arguments if isinstance(a, nodes.Const) and str(a.value).startswith("_"))
            continue
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        elif isinstance(node, nodes.Name):
            name = node.name
        else:
            continue
        if isinstance(name, str) and name.startswith("_"):
            yield name


# --- trees of templates: a node's ``with`` compiled once -------------------------


TreePath = tuple[str | int, ...]


def compile_tree(value: Any, path: TreePath, errors: list[tuple[TreePath, TemplateError]]) -> Any:
    """Replace every template string inside ``value`` with a compiled Template.

    Strings that fail to compile are left as they are and reported in ``errors``.
    """
    if is_template(value):
        try:
            return compile_template(value)
        except TemplateError as exc:
            errors.append((path, exc))
            return value
    if isinstance(value, dict):
        return {key: compile_tree(item, (*path, key), errors) for key, item in value.items()}
    if isinstance(value, list):
        return [compile_tree(item, (*path, index), errors) for index, item in enumerate(value)]
    return value


def iter_templates(value: Any, path: TreePath = ()) -> Iterator[tuple[TreePath, Template]]:
    """Every compiled Template inside ``value`` with its path."""
    if isinstance(value, Template):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_templates(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from iter_templates(item, (*path, index))


def render_tree(value: Any, context: dict[str, Any]) -> Any:
    """Render every compiled Template inside ``value``."""
    if isinstance(value, Template):
        return value.render(context)
    if isinstance(value, dict):
        return {key: render_tree(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [render_tree(item, context) for item in value]
    return value
