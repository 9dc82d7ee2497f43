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
import math
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.nativetypes import NativeCodeGenerator

from flowchat.errors import FlowChatError, TemplateError, TemplateSecurityError
from flowchat.sandbox import (
    INTERCEPTED_BINOPS,
    MAX_TEXT,
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
RESERVED_NAMES = CONTEXT_NAMES | {"secrets", "self"}
"""Names of the template context, and ``self`` (Jinja's own): a node id may not take them."""

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
        # `{{ a if b }}` with b false is Jinja's plain Undefined (not strict): nothing, as text renders ""
        return None if isinstance(parts[0], jinja2.Undefined) else parts[0]
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
        # the context built by hand: Jinja's own walks its ChainMap of globals twice on every render
        parent = {**_GLOBALS, **dict(*args, **kwargs)}
        context = self.environment.context_class(self.environment, parent, self.name, self.blocks)
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
    _fast: Fast | None = None
    """The template as plain Python, when it is simple enough (:func:`_fast_renderer`)."""

    def render(self, context: dict[str, Any]) -> Any:
        if self._fast is not None:  # bounded by its own size: no step budget to keep
            try:
                result = self._fast(context)
            except _Defer:
                pass
            except Exception as exc:
                self._raise(exc)
            else:
                return self._typed(result)
        budget = start_budget()
        try:
            result = self._compiled.render(context)
        except Exception as exc:
            self._raise(exc)
        finally:
            end_budget(budget)
        return self._typed(result)

    def _typed(self, result: Any) -> Any:
        if self.text and isinstance(result, int | float) and not isinstance(result, bool):
            return str(result)
        return result

    def _raise(self, exc: Exception) -> NoReturn:
        error = self._error(exc)
        if error is exc:
            raise exc
        raise error from exc

    def _error(self, exc: Exception) -> Exception:
        """What rendering failed with, as the error the node fails with."""
        if isinstance(exc, TemplateLimitExceeded):
            return TemplateError(f"{exc} in {_short(self.source)}", code="template-limit")
        if isinstance(exc, SecurityError):
            return TemplateSecurityError(f"{exc} in {self.source!r}")
        if isinstance(exc, jinja2.UndefinedError):
            return TemplateError(f"{exc} in {self.source!r}", code="template-undefined")
        if isinstance(exc, FlowChatError):
            return exc  # raised on purpose by something the context holds (a missing secret): keep its code
        if isinstance(exc, MemoryError | RecursionError):
            return TemplateError(f"{type(exc).__name__} in {_short(self.source)}", code="template-limit")
        # a filter or operator failing on the data: that node's error, not a crash
        return TemplateError(f"{type(exc).__name__}: {exc} in {self.source!r}")

    def as_text(self) -> Template:
        """This template, rendering numbers as strings."""
        return Template(self.source, self.names, self._compiled, self.var_keys, True, self._fast)


class _Defer(Exception):
    """Raised while rendering without Jinja: this context needs Jinja to decide (a missing key …)."""


class _Unsupported(Exception):
    """Raised while compiling: this expression is outside the subset rendered without Jinja."""


Fast = Callable[[dict[str, Any]], Any]
_JINJA_NAMES = frozenset({*_GLOBALS, "self"})
"""Names Jinja answers itself: the globals, and ``self`` (the template), whatever the context holds."""
_DICT_ATTRIBUTES = frozenset(dir(dict))
"""``x.items`` is dict.items in Jinja, not the key "items": such lookups take Jinja's path."""
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gteq": operator.ge,
    "lt": operator.lt,
    "lteq": operator.le,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}


def _fast_renderer(tree: nodes.Template) -> Fast | None:
    """The template as plain Python when it only holds text, lookups, literals, ``or``/``and``/``not``,
    ``… if … else …`` and comparisons (``"reply:{{ contact.phone }}"``, ``{{ a.b or 'friend' }}``):
    the same values Jinja gives, without a Jinja context per render. None when it holds anything else."""
    if len(tree.body) != 1 or not isinstance(tree.body[0], nodes.Output):
        return None
    try:
        parts = [_text_part(child.data) if isinstance(child, nodes.TemplateData) else _expression(child) for child in tree.body[0].nodes]
    except _Unsupported:
        return None
    if len(parts) == 1:
        only = parts[0]

        def render_one(context: dict[str, Any]) -> Any:
            value = only(context)
            if isinstance(value, str):
                check_text(len(value))
            return value

        return render_one

    def render_text(context: dict[str, Any]) -> Any:
        # Jinja's concat for text around expressions; the parts are context values (never Undefined,
        # never lazy: lookups defer those to Jinja), so each is just its str; the size is checked as it grows
        texts: list[str] = []
        size = 0
        for part in parts:
            text = str(part(context))
            size += len(text)
            if size > MAX_TEXT:
                check_text(size)
            texts.append(text)
        return "".join(texts)

    return render_text


def _text_part(data: str) -> Fast:
    return lambda context: data


def _expression(node: nodes.Node) -> Fast:
    if isinstance(node, nodes.Const) and type(node.value) in (str, int, float, bool, type(None)):
        value = node.value
        if isinstance(value, float) and not math.isfinite(value):
            raise _Unsupported  # Jinja's code spells 1e400 as `inf`, a NameError when it runs
        return lambda context: value
    if isinstance(node, nodes.List):
        items = [_expression(item) for item in node.items]
        return lambda context: [item(context) for item in items]
    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name not in _JINJA_NAMES:
        return _name(node.name)
    if isinstance(node, nodes.Getattr) and node.attr not in _DICT_ATTRIBUTES:
        return _key(_expression(node.node), node.attr)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and type(node.arg.value) in (str, int):
        return _key(_expression(node.node), node.arg.value)  # a subscript is the key first in Jinja, even ['items']
    if isinstance(node, nodes.Or | nodes.And):
        left, right = _expression(node.left), _expression(node.right)
        if isinstance(node, nodes.Or):
            return lambda context: left(context) or right(context)
        return lambda context: left(context) and right(context)
    if isinstance(node, nodes.Not):
        inner = _expression(node.node)
        return lambda context: not inner(context)
    if isinstance(node, nodes.CondExpr) and node.expr2 is not None:
        test, then, otherwise = _expression(node.test), _expression(node.expr1), _expression(node.expr2)
        return lambda context: then(context) if test(context) else otherwise(context)
    if isinstance(node, nodes.Compare) and all(op.op in _COMPARE for op in node.ops):
        return _comparison(_expression(node.expr), [(_COMPARE[op.op], _expression(op.expr)) for op in node.ops])
    if isinstance(node, nodes.Filter) and node.name in _FAST_FILTERS and node.node is not None:
        if node.kwargs or node.dyn_args is not None or node.dyn_kwargs is not None:
            raise _Unsupported
        return _filter(node.name, _expression(node.node), [_expression(arg) for arg in node.args])
    raise _Unsupported


_FAST_FILTERS = frozenset(
    {"truncate", "lower", "upper", "trim", "title", "capitalize", "length", "count", "string", "int", "float",
     "abs", "round", "default", "d", "first", "last", "wordcount"}
)  # fmt: skip
"""Filters that return a plain value (never a generator), called as Jinja's compiled code calls them."""


def _filter(name: str, value: Fast, args: list[Fast]) -> Fast:
    function = ENVIRONMENT.filters[name]
    passes = getattr(function, "jinja_pass_arg", None)
    if passes is not None and passes.name != "environment":
        raise _Unsupported
    leading = (ENVIRONMENT,) if passes is not None else ()

    def call(context: dict[str, Any]) -> Any:
        result = function(*leading, value(context), *[arg(context) for arg in args])
        if isinstance(result, jinja2.Undefined):
            raise _Defer  # `[] | first`: Jinja's own path says what is undefined, and fails
        return result

    return call


_PLAIN = frozenset({str, int, float, bool, type(None), dict, list})
"""Types of what JSON and node outputs hold: never an iterator (the ABC check is the slow way to know)."""


def _name(name: str) -> Fast:
    def look_up(context: dict[str, Any]) -> Any:
        value = context.get(name, _MISSING)
        if type(value) not in _PLAIN and (value is _MISSING or isinstance(value, Iterator)):
            raise _Defer
        return value

    return look_up


def _key(parent: Fast, key: str | int) -> Fast:
    def look_up(context: dict[str, Any]) -> Any:
        value = parent(context)
        if type(value) is dict:
            value = value.get(key, _MISSING)
        elif type(value) is list and type(key) is int and -len(value) <= key < len(value):
            value = value[key]
        else:
            raise _Defer  # an attribute, a string's character, the secrets view …: Jinja's rules
        if type(value) not in _PLAIN and (value is _MISSING or isinstance(value, Iterator)):
            raise _Defer
        return value

    return look_up


def _comparison(first: Fast, rest: list[tuple[Callable[[Any, Any], Any], Fast]]) -> Fast:
    def compare(context: dict[str, Any]) -> Any:
        left = first(context)
        for op, operand in rest:  # chained like Python (and Jinja): a < b < c
            right = operand(context)
            if not op(left, right):
                return False
            left = right
        return True

    return compare


_MISSING: Any = object()


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
    fast = _fast_renderer(tree)  # first: Jinja's analysis and compiler rewrite nodes in place
    try:
        names = frozenset(meta.find_undeclared_variables(tree))
        compiled = ENVIRONMENT.from_string(tree)
    except jinja2.UndefinedError as exc:  # folding constants: {{ 1 if 1.x else 2 }}
        raise TemplateError(f"{exc} in {source!r}", code="template-undefined") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template: {exc} in {source!r}", code="template-syntax") from exc
    except RecursionError as exc:
        raise TemplateError(f"template nested too deeply in {_short(source)}", code="template-limit") from exc
    return Template(source, names, compiled, frozenset(_var_keys(tree)), _fast=fast)


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


Renderer = Callable[[dict[str, Any]], Any]


def tree_renderer(value: Any) -> Renderer:
    """:func:`render_tree` for one tree, with its shape decided once (a node's ``with``, at load time).

    As with ``render_tree``, every render builds new dicts and lists, so nothing a node may change is shared.
    """
    if isinstance(value, Template):
        return value.render
    if isinstance(value, dict):
        entries = [(key, tree_renderer(item)) for key, item in value.items()]
        return lambda context: {key: render(context) for key, render in entries}
    if isinstance(value, list):
        items = [tree_renderer(item) for item in value]
        return lambda context: [render(context) for render in items]
    return lambda context: value


def render_tree(value: Any, context: dict[str, Any]) -> Any:
    """Render every compiled Template inside ``value``."""
    if isinstance(value, Template):
        return value.render(context)
    if isinstance(value, dict):
        return {key: render_tree(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [render_tree(item, context) for item in value]
    return value
