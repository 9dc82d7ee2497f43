"""YAML documents that remember where every value came from, read within bounds.

Flow validation reports ``file:line:col``; pydantic reports paths such as
``("nodes", 3, "with", "body")``. A :class:`Document` maps one to the other.

Flow files are written by people, so reading one is bounded: the document is
built from the parser's event stream (no recursion, so no RecursionError), with
a nesting limit, an alias-expansion limit (a "billion laughs" file stops at the
first alias over it) and only the JSON-compatible standard tags (``!!str``,
``!!int``, ``!!float``, ``!!bool``, ``!!null``, ``!!map``, ``!!seq``); dates
stay strings. Merge keys (``<<: *anchor``) are refused too (a plain ``<<`` key; a
quoted ``"<<"`` is an ordinary key). Anything else is a problem at its position,
never a traceback.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from flowchat.errors import FlowError, Location

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    line: int
    col: int


@dataclass(slots=True)
class Document:
    """Plain data parsed from YAML plus the position of each value and key."""

    file: str
    data: Any
    values: dict[Path, Mark] = field(default_factory=dict)
    keys: dict[Path, Mark] = field(default_factory=dict)

    def locate(self, path: Path, *, key: bool = False) -> Location:
        """Position of ``path`` (of its key if ``key``), else its nearest ancestor."""
        marks = self.keys if key else self.values
        probe = tuple(path)
        while probe:
            mark = marks.get(probe) or self.values.get(probe)
            if mark:
                return Location(file=self.file, line=mark.line, col=mark.col, path=dotted(path))
            probe = probe[:-1]
        root = self.values.get((), Mark(1, 1))
        return Location(file=self.file, line=root.line, col=root.col, path=dotted(path))

    def error(self, path: Path, code: str, message: str, *, key: bool = False) -> FlowError:
        return FlowError(message, code=code, location=self.locate(path, key=key))


def dotted(path: Path) -> str:
    """``("nodes", 3, "with", "body")`` → ``nodes[3].with.body``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


MAX_DEPTH = 64
"""Deepest nesting of mappings and lists in a flow file."""
MAX_VALUES = 50_000
"""Most values (scalars, mappings and lists) in a flow file: reading each costs microseconds."""
MAX_ALIAS_VALUES = 10_000
"""Values that aliases (``*name``) may copy in one file, counted with what they contain."""

_STANDARD = "tag:yaml.org,2002:"
_ALLOWED_TAGS = {f"{_STANDARD}{name}" for name in ("str", "int", "float", "bool", "null", "map", "seq")} | {"!"}
_MERGE = f"{_STANDARD}merge"
_RESOLVER = Resolver()
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Stop(Exception):
    """The document cannot be read further; the error is already recorded."""


def parse_yaml(text: str, file: str) -> tuple[Document, list[FlowError]]:
    """Parse ``text`` within the limits; syntax errors, duplicate keys, tags and limits come back as errors."""
    document = Document(file=file, data=None)
    reader = _Reader(document)
    try:
        reader.read(yaml.parse(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        location = Location(file=file, line=line, col=col)
        return document, [FlowError(f"{problem}{context}", code="yaml-syntax", location=location)]
    except yaml.YAMLError as exc:
        return document, [FlowError(f"invalid YAML: {exc}", code="yaml-syntax", location=Location(file, 1, 1))]
    except _Stop:
        pass
    return document, reader.errors


@dataclass(slots=True)
class _Open:
    """A mapping or list being read: its value, path, anchor, and the key waiting for its value."""

    value: dict[Any, Any] | list[Any]
    path: Path
    anchor: str | None
    size: int = 1
    key: Any = None
    key_mark: Mark | None = None
    has_key: bool = False


class _Reader:
    """Builds plain data from parser events, iteratively, counting what aliases copy."""

    def __init__(self, document: Document) -> None:
        self.document = document
        self.errors: list[FlowError] = []
        self.stack: list[_Open] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.open_anchors: set[str] = set()
        self.copied = 0
        self.count = 0
        self.documents = 0

    def read(self, events: Any) -> None:
        for event in events:
            if isinstance(event, yaml.DocumentStartEvent):
                self.documents += 1
                if self.documents > 1:
                    self._fail(event, "yaml-syntax", "a flow file holds one YAML document (found a second '---')")
            elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                self._start(event)
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                self._end()
            elif isinstance(event, yaml.ScalarEvent):
                self._add(event, self._scalar(event), 1)
            elif isinstance(event, yaml.AliasEvent):
                self._alias(event)

    # --- events ------------------------------------------------------------------

    def _start(self, event: Any) -> None:
        if len(self.stack) >= MAX_DEPTH:
            self._fail(event, "yaml-limit", f"nesting deeper than {MAX_DEPTH} levels")
        self._check_tag(event, event.tag)
        self._counted(event)
        path = self._child_path(event)
        if path is None:
            return
        container: dict[Any, Any] | list[Any] = {} if isinstance(event, yaml.MappingStartEvent) else []
        self.document.values[path] = _event_mark(event)
        if event.anchor:
            self.open_anchors.add(event.anchor)
        self.stack.append(_Open(container, path, event.anchor))

    def _end(self) -> None:
        done = self.stack.pop()
        if done.anchor:
            self.open_anchors.discard(done.anchor)
            self.anchors[done.anchor] = (done.value, done.size)
        if self.stack:
            self._place(done.value, done.size)
        else:
            self.document.data = done.value

    def _alias(self, event: yaml.AliasEvent) -> None:
        name = event.anchor or ""
        if name in self.open_anchors:
            self._fail(event, "yaml-alias", f"alias *{name} refers to a value that contains it (a cycle)")
        if name not in self.anchors:
            self._fail(event, "yaml-syntax", f"found undefined alias *{name}")
        value, size = self.anchors[name]
        self.copied += size
        if self.copied > MAX_ALIAS_VALUES:
            self._fail(event, "yaml-limit", f"aliases copy more than {MAX_ALIAS_VALUES} values")
        # a copy, so that no two places in a flow share (and could change) one value
        self._add(event, copy.deepcopy(value) if isinstance(value, dict | list) else value, size)

    def _add(self, event: Any, value: Any, size: int) -> None:
        self._counted(event)
        path = self._child_path(event)
        if path is None:
            return
        self.document.values[path] = _event_mark(event)
        if getattr(event, "anchor", None) and not isinstance(event, yaml.AliasEvent):
            self.anchors[event.anchor] = (value, size)
        if self.stack:
            self._place(value, size)
        else:
            self.document.data = value

    def _place(self, value: Any, size: int) -> None:
        parent = self.stack[-1]
        parent.size += size
        if isinstance(parent.value, list):
            parent.value.append(value)
        elif not parent.has_key:
            parent.key, parent.has_key = _hashable(value), True
        else:
            parent.has_key = False
            child = (*parent.path, parent.key)
            if parent.key in parent.value:
                self.document.values.pop(child, None)
                self.errors.append(
                    self.document.error(child, "yaml-duplicate-key", f"duplicate key {parent.key!r}", key=True)
                )
                return
            parent.value[parent.key] = value

    def _child_path(self, event: Any) -> Path | None:
        """The path of the value ``event`` starts; records a key's position when it is one."""
        if not self.stack:
            return ()
        parent = self.stack[-1]
        if isinstance(parent.value, list):
            return (*parent.path, len(parent.value))
        if not parent.has_key:
            return (*parent.path, "\0key")  # a key being read: its own marks are not kept
        child = (*parent.path, parent.key)
        key_mark = self.document.values.pop((*parent.path, "\0key"), None)
        if key_mark is not None:
            self.document.keys[child] = key_mark
        return child

    # --- scalars and tags ----------------------------------------------------------

    def _scalar(self, event: yaml.ScalarEvent) -> Any:
        plain, _quoted = event.implicit
        if event.tag is None or event.tag == "!":
            tag = (
                _RESOLVER.resolve(yaml.ScalarNode, event.value, (plain, False))
                if event.tag is None
                else _STANDARD + "str"
            )
        else:
            tag = event.tag
        if tag == f"{_STANDARD}timestamp" and event.tag is None:
            return event.value  # dates stay text: a flow file holds JSON values
        if tag == _MERGE and event.tag is None and self._reading_key():
            # a merge would silently become a literal '<<' key (or, elsewhere, a crash): refuse it where it stands
            self._fail(event, "yaml-merge", "merge keys ('<<: *anchor') are not supported: write the keys out")
        self._check_tag(event, event.tag)
        return self._construct(event, tag)

    def _reading_key(self) -> bool:
        return bool(self.stack) and isinstance(self.stack[-1].value, dict) and not self.stack[-1].has_key

    def _check_tag(self, event: Any, given: str | None) -> None:
        if given is None or given in _ALLOWED_TAGS:
            return
        shown = given.replace(_STANDARD, "!!")
        self._fail(event, "yaml-tag", f"tag {shown} is not allowed (only the JSON-compatible standard tags)")

    def _construct(self, event: yaml.ScalarEvent, tag: str) -> Any:
        node = yaml.ScalarNode(tag, event.value, style=event.style)
        construct = _CONSTRUCTORS.get(tag)
        if construct is None:
            return event.value
        try:
            value = construct(_CONSTRUCTOR, node)
        except (ValueError, ArithmeticError, TypeError, yaml.YAMLError) as exc:
            shown = tag.replace(_STANDARD, "!!")
            reason = (str(exc).splitlines() or [type(exc).__name__])[0].split(";")[0]
            code = "yaml-tag" if event.tag else "yaml-limit"
            self._fail(event, code, f"{event.value[:40]!r} is not a valid {shown}: {reason}")
        return value

    def _counted(self, event: Any) -> None:
        self.count += 1
        if self.count > MAX_VALUES:
            self._fail(event, "yaml-limit", f"more than {MAX_VALUES} values in one flow file")

    def _fail(self, event: Any, code: str, message: str) -> None:
        mark = _event_mark(event)
        self.errors.append(FlowError(message, code=code, location=Location(self.document.file, mark.line, mark.col)))
        raise _Stop


def _event_mark(event: Any) -> Mark:
    mark = event.start_mark
    return Mark(mark.line + 1, mark.column + 1) if mark is not None else Mark(1, 1)


def _hashable(key: Any) -> Any:
    if isinstance(key, dict | list):
        return str(key)
    if isinstance(key, float) and math.isnan(key):
        return "nan"
    return key


class _StatelessConstructor(SafeConstructor):
    """Only for the scalar constructors, which keep no state between calls (no reload leak)."""


_CONSTRUCTOR = _StatelessConstructor()
_CONSTRUCTORS: dict[str, Any] = {
    f"{_STANDARD}str": SafeConstructor.construct_scalar,
    f"{_STANDARD}int": SafeConstructor.construct_yaml_int,
    f"{_STANDARD}float": SafeConstructor.construct_yaml_float,
    f"{_STANDARD}bool": SafeConstructor.construct_yaml_bool,
    f"{_STANDARD}null": SafeConstructor.construct_yaml_null,
}
