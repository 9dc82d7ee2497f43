"""YAML documents that remember where every value came from.

Flow validation reports ``file:line:col``; pydantic reports paths such as
``("nodes", 3, "with", "body")``. A :class:`Document` maps one to the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

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


def parse_yaml(text: str, file: str) -> tuple[Document, list[FlowError]]:
    """Parse ``text``; syntax errors and duplicate keys come back as errors."""
    document = Document(file=file, data=None)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        location = Location(file=file, line=line, col=col)
        return document, [FlowError(f"{problem}{context}", code="yaml-syntax", location=location)]
    errors: list[FlowError] = []
    document.data = _build(root, (), document, errors) if root is not None else None
    return document, errors


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _build(node: yaml.Node, path: Path, document: Document, errors: list[FlowError]) -> Any:
    document.values[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            child = (*path, key)
            if key in result:
                document.keys[child] = _mark(key_node)
                errors.append(document.error(child, "yaml-duplicate-key", f"duplicate key {key!r}", key=True))
                continue
            document.keys[child] = _mark(key_node)
            result[key] = _build(value_node, child, document, errors)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, index), document, errors) for index, item in enumerate(node.value)]
    return _scalar(node)


_constructor = yaml.SafeLoader("")


def _scalar(node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return _constructor.construct_object(node, deep=True)
    return str(_constructor.construct_object(node, deep=True))
