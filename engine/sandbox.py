"""The template sandbox with limits: no template can take much more memory or time than its data.

Jinja's sandbox stops templates reaching private attributes; it does not stop
``{{ 10 ** 100000000 }}`` (minutes holding the GIL, so no thread or timer can
interrupt it) or ``{{ 'a' * 1000000000 }}``. Here the size of a result is
estimated *before* it is computed, and work over a limit fails with
``template-limit``:

- ``**`` and ``*`` on integers: results up to ``MAX_INT_DIGITS`` digits;
- ``*`` on strings and lists, ``join``, ``replace``, ``center``/``ljust``/…,
  ``indent``, ``batch``/``slice`` fill, ``tojson`` indent, ``%`` and ``format``
  widths, the rendered text itself: up to ``MAX_TEXT`` characters (or items);
- ``range``: ``MAX_RANGE`` items per call; ``lipsum``: ``MAX_LIPSUM`` paragraphs;
- every render has a budget of ``MAX_STEPS`` steps (attribute and item reads,
  calls, operators, range items, output parts), so nested loops end.

Mappings are read item before attribute: ``{{ trigger.items }}`` is the
payload's ``items`` key, not ``dict.items``.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEXT = 1_000_000
"""Longest string (or list) a template operation may build, and longest rendered text."""
MAX_INT_DIGITS = 4_300
"""Most decimal digits of an integer a template may compute (Python's own str conversion limit)."""
MAX_RANGE = 100_000
"""Most items of one ``range()``."""
MAX_LIPSUM = 100
"""Most paragraphs (and words per paragraph / 10) of one ``lipsum()``."""
MAX_STEPS = 1_000_000
"""Steps one render may take: attribute/item reads, calls, operators, range items, output parts."""

INTERCEPTED_BINOPS = frozenset({"*", "**", "%"})
"""Operators computed through :func:`check_binop` (and therefore never folded at compile time)."""


class TemplateLimitExceeded(Exception):
    """A template operation would go over a limit; raised before the work is done."""


_steps: ContextVar[list[int] | None] = ContextVar("flowchat_template_steps", default=None)


def start_budget() -> Any:
    """Give the current render a fresh step budget; returns the token for :func:`end_budget`."""
    return _steps.set([MAX_STEPS])


def end_budget(token: Any) -> None:
    _steps.reset(token)


def spend(steps: int = 1) -> None:
    budget = _steps.get()
    if budget is None:
        return  # not rendering (compile-time folding attempts): sizes are still checked
    budget[0] -= steps
    if budget[0] < 0:
        raise TemplateLimitExceeded(f"the template took more than {MAX_STEPS} steps")


def _over_text(size: float, what: str) -> None:
    if size > MAX_TEXT:
        raise TemplateLimitExceeded(f"{what} would be {int(size)} long, over the limit of {MAX_TEXT}")


def _digits(value: int) -> float:
    return abs(value).bit_length() * math.log10(2)


def _is_int(value: Any) -> bool:
    return isinstance(value, int)


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``left <operator> right`` if its result would be over a limit."""
    if operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        digits = right * math.log10(abs(left))
        if digits > MAX_INT_DIGITS:
            raise TemplateLimitExceeded(f"{left} ** {right} has about {digits:.0f} digits, over {MAX_INT_DIGITS}")
    elif operator == "*":
        if _is_int(left) and _is_int(right):
            if _digits(left) + _digits(right) > MAX_INT_DIGITS + 1:
                raise TemplateLimitExceeded(f"a product of more than {MAX_INT_DIGITS} digits")
        elif _is_int(right) and isinstance(left, str | list | tuple):
            _over_text(len(left) * right, f"{type(left).__name__} * {right}")
        elif _is_int(left) and isinstance(right, str | list | tuple):
            _over_text(len(right) * left, f"{left} * {type(right).__name__}")
    elif operator == "%" and isinstance(left, str):
        _check_percent_format(left, right)


def _ints_in(args: Any) -> Iterator[int]:
    values = args.values() if isinstance(args, Mapping) else args if isinstance(args, tuple | list) else (args,)
    return (value for value in values if _is_int(value))


def _check_percent_format(text: str, args: Any) -> None:
    spec_numbers = [int(number) for groups in _PERCENT_WIDTH.findall(text) for number in groups if number]
    if any(number > MAX_TEXT for number in spec_numbers):
        raise TemplateLimitExceeded(f"a format width over {MAX_TEXT}")
    if "*" in text and any(value > MAX_TEXT for value in _ints_in(args)):
        raise TemplateLimitExceeded(f"a format width over {MAX_TEXT}")


_PERCENT_WIDTH = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?")


def _check_brace_format(text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError:
        return  # str.format reports it
    for _literal, _name, spec, _conversion in fields:
        if not spec:
            continue
        if "{" in spec:  # a width taken from an argument
            if any(value > MAX_TEXT for value in (*_ints_in(args), *_ints_in(kwargs))):
                raise TemplateLimitExceeded(f"a format width over {MAX_TEXT}")
        numbers = re.findall(r"\d+", spec)
        if any(int(number) > MAX_TEXT for number in numbers):
            raise TemplateLimitExceeded(f"a format width over {MAX_TEXT}")


def _width_guard(position: int, name: str) -> Callable[[tuple[Any, ...], dict[str, Any]], None]:
    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        width = args[position] if len(args) > position else kwargs.get(name)
        if isinstance(width, int):
            _over_text(width, f"a width of {width}")

    return check


def _join_guard(sep: str, items: Any) -> None:
    if isinstance(items, list | tuple):
        _over_text(sum(len(str(item)) for item in items[: MAX_TEXT + 1]) + len(sep) * len(items), "the joined text")


def _replace_guard(text: str, old: Any, new: Any, count: Any = -1) -> None:
    if isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        hits = text.count(old) if old else len(text) + 1
        if _is_int(count) and count >= 0:
            hits = min(hits, count)
        _over_text(len(text) + hits * (len(new) - len(old)), "the replaced text")


_STR_METHOD_GUARDS: dict[str, Callable[..., None]] = {
    "center": lambda text, *a, **k: _width_guard(0, "width")(a, k),
    "ljust": lambda text, *a, **k: _width_guard(0, "width")(a, k),
    "rjust": lambda text, *a, **k: _width_guard(0, "width")(a, k),
    "zfill": lambda text, *a, **k: _width_guard(0, "width")(a, k),
    "expandtabs": lambda text, size=8, **k: _over_text(len(text) + text.count("\t") * size, "the expanded text"),
    "join": lambda text, items, **k: _join_guard(text, list(items) if isinstance(items, tuple) else items),
    "replace": lambda text, old, new, count=-1, **k: _replace_guard(text, old, new, count),
    "format": lambda text, *a, **k: _check_brace_format(text, a, k),
    "format_map": lambda text, mapping, **k: _check_brace_format(text, (), mapping),
}


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with sizes checked before work and a step budget per render."""

    intercepted_binops = INTERCEPTED_BINOPS

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        spend()
        check_binop(operator, left, right)
        return self.binop_table[operator](left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        spend()
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]  # item before attribute: payload keys such as `items` or `keys`
        value = super().getattr(obj, attribute)
        if isinstance(obj, str) and attribute in _STR_METHOD_GUARDS and callable(value):
            return _guarded_method(obj, value, _STR_METHOD_GUARDS[attribute])
        return value

    def getitem(self, obj: Any, argument: Any) -> Any:
        spend()
        return super().getitem(obj, argument)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        spend()
        return super().call(__context, __obj, *args, **kwargs)


def _guarded_method(text: str, method: Callable[..., Any], guard: Callable[..., None]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        guard(text, *args, **kwargs)
        return method(*args, **kwargs)

    return call


# --- filters and globals with their sizes checked -----------------------------------------


def guard_filters(filters: dict[str, Callable[..., Any]]) -> None:
    """Wrap the built-in filters that can build big results from small inputs."""
    checks: dict[str, Callable[..., None]] = {
        "center": lambda value, width=80, *a, **k: _width_guard(0, "width")((width,), {}),
        "indent": lambda value, width=4, *a, **k: _over_text(
            len(str(value)) * (1 + (width if _is_int(width) else len(str(width)))), "the indented text"
        ),
        "join": lambda ctx, value, d="", *a, **k: _join_guard(str(d), value),
        "replace": lambda ctx, value, old, new, count=None: _replace_guard(
            str(value), old, new, -1 if count is None else count
        ),
        "format": lambda value, *a, **k: _check_percent_format(str(value), k or a),
        "batch": lambda value, linecount, *a, **k: _over_text(linecount, f"a batch of {linecount}"),
        "slice": lambda value, slices, *a, **k: _over_text(slices, f"{slices} slices"),
        "tojson": lambda ctx, value, indent=None: _over_text(indent if _is_int(indent) else 0, "a JSON indent"),
        # round(7, -10**7) computes 10**10**7 first
        "round": lambda value, precision=0, *a, **k: _precision_guard(precision),
    }
    for name, check in checks.items():
        if name in filters:
            filters[name] = _guarded_filter(filters[name], check)


def _precision_guard(precision: Any) -> None:
    if _is_int(precision) and abs(precision) > MAX_INT_DIGITS:
        raise TemplateLimitExceeded(f"rounding to {precision} digits is over the limit of {MAX_INT_DIGITS}")


def _guarded_filter(original: Callable[..., Any], check: Callable[..., None]) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        spend()
        check(*args, **kwargs)
        return original(*args, **kwargs)

    if hasattr(original, "jinja_pass_arg"):  # keep pass_environment / pass_eval_context
        guarded.jinja_pass_arg = original.jinja_pass_arg  # type: ignore[attr-defined]
    guarded.__name__ = getattr(original, "__name__", "filter")
    return guarded


def bounded_range(*args: Any) -> range:
    """``range`` with at most MAX_RANGE items, each spent from the render's budget."""
    result = range(*args)
    if len(result) > MAX_RANGE:
        raise TemplateLimitExceeded(f"range() of {len(result)} items is over the limit of {MAX_RANGE}")
    spend(len(result))
    return result


def check_lipsum(n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> None:
    """``lipsum()`` arguments within MAX_LIPSUM paragraphs of MAX_LIPSUM * 10 words."""
    if not (_is_int(n) and _is_int(max)) or n > MAX_LIPSUM or max > MAX_LIPSUM * 10:
        raise TemplateLimitExceeded(f"lipsum() takes at most {MAX_LIPSUM} paragraphs of {MAX_LIPSUM * 10} words")


def bounded_lipsum(original: Callable[..., Any]) -> Callable[..., Any]:
    def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:
        check_lipsum(n, html, min, max)
        return original(n, html, min, max)

    return lipsum


def check_text(size: int) -> None:
    """The rendered text itself is bounded."""
    _over_text(size, "the rendered text")
