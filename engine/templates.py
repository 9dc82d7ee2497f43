"""Jinja2 templates in a sandbox, with native types.

``"{{ contact.tags }}"`` renders the list itself and ``"{{ n + 1 }}"`` an int;
a string with text around its expressions renders as a string. Templates are
compiled once when a flow loads; rendering an undefined name fails loudly and
names the expression. Anything reaching for private attributes
(``''.__class__``) is refused at load time and again by the sandbox at run time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.nativetypes import NativeCodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from flowchat.errors import TemplateError, TemplateSecurityError

CONTEXT_NAMES = frozenset({"trigger", "vars", "flow", "execution", "secrets"})
"""Names every template may use besides upstream node ids."""

_SAFE_GLOBALS = ("range", "dict", "lipsum")


def _concat(values: Iterable[Any]) -> Any:
    parts = [_materialise(part) for part in values]
    for part in parts:
        _refuse_undefined(part)
    if len(parts) == 1:
        return parts[0]
    return "".join(str(part) for part in parts)


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


class _NativeSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    concat = staticmethod(_concat)


class _NativeTemplate(jinja2.Template):
    environment_class = _NativeSandbox

    def render(self, *args: Any, **kwargs: Any) -> Any:
        context = self.new_context(dict(*args, **kwargs))
        return _concat(self.root_render_func(context))


_NativeSandbox.template_class = _NativeTemplate


def _environment() -> _NativeSandbox:
    env = _NativeSandbox(undefined=jinja2.StrictUndefined, autoescape=False)
    env.globals = {name: env.globals[name] for name in _SAFE_GLOBALS if name in env.globals}
    return env


ENVIRONMENT = _environment()


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


@dataclass(frozen=True, slots=True)
class Template:
    """One compiled template string and the top-level names it reads."""

    source: str
    names: frozenset[str]
    _compiled: jinja2.Template

    def render(self, context: dict[str, Any]) -> Any:
        try:
            return self._compiled.render(context)
        except SecurityError as exc:
            raise TemplateSecurityError(f"{exc} in {self.source!r}") from exc
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"{exc} in {self.source!r}", code="template-undefined") from exc
        except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
            raise TemplateError(f"{type(exc).__name__}: {exc} in {self.source!r}") from exc


def compile_template(source: str) -> Template:
    """Compile ``source``; raise TemplateError (syntax) or TemplateSecurityError."""
    try:
        tree = ENVIRONMENT.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax: {exc.message} in {source!r}", code="template-syntax") from exc
    unsafe = next(_unsafe_accesses(tree), None)
    if unsafe is not None:
        raise TemplateSecurityError(f"access to {unsafe!r} is not allowed in {source!r}")
    names = frozenset(meta.find_undeclared_variables(tree))
    return Template(source, names, ENVIRONMENT.from_string(tree))


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
