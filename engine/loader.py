"""Load flow files, reporting every problem at once as ``file:line:col: [code] message``."""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from flowchat.documents import Document, dotted, parse_yaml
from flowchat.documents import Path as DocPath
from flowchat.errors import FlowChatError, FlowError, FlowInvalid, TemplateError
from flowchat.fields import SCHEMA_FILE_MARK, read_schema_file
from flowchat.flow import Flow, FlowNode
from flowchat.graph import ancestors, dependents_of, find_cycle, resolve_needs
from flowchat.node import RetryPolicy
from flowchat.registry import Registry
from flowchat.spec import FlowSpec, NodeSpec
from flowchat.templates import (
    CONTEXT_NAMES,
    RESERVED_NAMES,
    Template,
    compile_expression,
    compile_tree,
    is_template,
    iter_templates,
)

FLOW_SUFFIXES = (".yaml", ".yml")
M = TypeVar("M", bound=BaseModel)


MAX_FLOW_BYTES = 1024 * 1024
"""Largest flow file read (1 MiB): reading one file is bounded in time and memory."""


MAX_NODES = 1000
"""Most nodes in one flow."""
MAX_TEMPLATES = 1000
"""Most template strings in one flow (each is compiled to Python when the flow loads)."""


def load_flow(path: str | Path, registry: Registry) -> Flow:
    """Load one flow file; raise FlowInvalid with every problem found (never anything else)."""
    path = Path(path)
    return load_flow_text(read_flow_file(path), str(path), registry)


def read_flow_file(path: Path) -> str:
    """The text of a regular file of at most MAX_FLOW_BYTES; FlowInvalid otherwise."""

    def unreadable(message: str, code: str = "flow-unreadable") -> FlowInvalid:
        return FlowInvalid([FlowError(message, code=code).at(file=str(path), line=1, col=1)])

    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise unreadable("not a regular file (a flow file cannot be a device, FIFO or folder)")
        if info.st_size > MAX_FLOW_BYTES:
            raise unreadable(f"{info.st_size} bytes is over the flow file limit of {MAX_FLOW_BYTES}", "flow-too-large")
        with path.open("rb") as file:
            data = file.read(MAX_FLOW_BYTES + 1)
    except OSError as exc:
        raise unreadable(f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_FLOW_BYTES:
        raise unreadable(f"over the flow file limit of {MAX_FLOW_BYTES} bytes", "flow-too-large")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise unreadable(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc


def load_flow_text(text: str, file: str, registry: Registry) -> Flow:
    """Load a flow from its text; any failure at all comes back as FlowInvalid naming ``file``."""
    try:
        return _load_flow_text(text, file, registry)
    except FlowInvalid:
        raise
    except Exception as exc:  # a bug or an exhausted resource: a problem report for this file, never a traceback
        message = f"could not load this file: {type(exc).__name__}: {str(exc)[:200]}"
        raise FlowInvalid([FlowError(message, code="flow-load-failed").at(file=file, line=1, col=1)]) from exc


def _load_flow_text(text: str, file: str, registry: Registry) -> Flow:
    if len(text) > MAX_FLOW_BYTES:
        raise FlowInvalid(
            [
                FlowError(f"over the flow file limit of {MAX_FLOW_BYTES} bytes", code="flow-too-large").at(
                    file=file, line=1, col=1
                )
            ]
        )
    document, errors = parse_yaml(text, file)
    if errors:
        raise FlowInvalid(list(errors))
    flow, problems = _FlowBuilder(document, registry, text).build()
    if problems or flow is None:
        raise FlowInvalid(sorted(problems, key=lambda p: (p.location.line or 0, p.location.col or 0)))
    return flow


def flow_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders into the flow files below them, sorted.

    Symlinked folders are not followed (no loops) and unreadable folders are skipped.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = (
                Path(root) / name
                for root, _, names in os.walk(path)  # followlinks=False; errors ignored
                for name in names
                if name.endswith(FLOW_SUFFIXES)
            )
            files.extend(sorted(file for file in found if file.is_file()))
        else:
            files.append(path)
    return files


def load_flows(paths: Iterable[str | Path], registry: Registry) -> tuple[dict[str, Flow], list[FlowChatError]]:
    """Load every flow below ``paths``: the good ones by name, and all problems."""
    flows: dict[str, Flow] = {}
    problems: list[FlowChatError] = []
    for file in flow_files(paths):
        try:
            flow = load_flow(file, registry)
        except FlowInvalid as invalid:
            problems.extend(invalid.errors)
            continue
        clash = flow.clash(flows.values())
        if clash is not None:
            problems.append(clash)
            continue
        flows[flow.name] = flow
    return flows, problems


class _FlowBuilder:
    """Validates one parsed document in passes, collecting every problem."""

    def __init__(self, document: Document, registry: Registry, text: str) -> None:
        self.document = document
        self.registry = registry
        self.text = text
        self.version = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.problems: list[FlowChatError] = []

    def build(self) -> tuple[Flow | None, list[FlowChatError]]:
        data = self.document.data
        if not isinstance(data, dict):
            self._problem((), "flow-not-mapping", "a flow file must be a mapping with flow, trigger and nodes")
            return None, self.problems
        raw_nodes = data.get("nodes")
        if isinstance(raw_nodes, list) and len(raw_nodes) > MAX_NODES:
            # the graph checks grow with the square of the node count: refuse before running them
            self._problem(("nodes",), "flow-limit", f"{len(raw_nodes)} nodes; a flow has at most {MAX_NODES}")
            return None, self.problems
        templates = _count_templates(raw_nodes)
        if templates > MAX_TEMPLATES:
            # compiling a template takes milliseconds: a file of thousands would hold a reload for minutes
            message = f"{templates} templates; a flow has at most {MAX_TEMPLATES}"
            self._problem(("nodes",), "flow-limit", message)
            return None, self.problems
        spec = self._validate(FlowSpec, data, ())
        node_specs = self._node_specs(raw_nodes)
        needs = self._check_graph(node_specs)
        nodes = {node_id: built for node_id, built in self._build_nodes(node_specs, needs) if built is not None}
        if self.problems or spec is None:
            return None, self.problems
        flow = Flow(spec, nodes, self.document.file, self.version, dependents_of(needs), self.text)
        return flow, []

    # --- passes -----------------------------------------------------------------

    def _node_specs(self, raw_nodes: Any) -> list[tuple[int, NodeSpec]]:
        if not isinstance(raw_nodes, list):
            return []
        specs: list[tuple[int, NodeSpec]] = []
        seen: dict[str, int] = {}
        for index, raw in enumerate(raw_nodes):
            spec = self._validate(NodeSpec, raw, ("nodes", index)) or _known_keys_only(raw)
            if spec is None:
                continue
            if spec.id in seen:
                self._problem(
                    ("nodes", index, "id"),
                    "duplicate-node-id",
                    f"node id {spec.id!r} is already used by nodes[{seen[spec.id]}]",
                )
                continue
            seen[spec.id] = index
            if spec.id in RESERVED_NAMES:
                self._problem(
                    ("nodes", index, "id"),
                    "node-id-reserved",
                    f"node id {spec.id!r} would shadow the template name {spec.id!r}; choose another id",
                )
            specs.append((index, spec))
        return specs

    def _check_graph(self, specs: list[tuple[int, NodeSpec]]) -> dict[str, tuple[str, ...]]:
        needs = resolve_needs([(spec.id, spec.needs) for _, spec in specs])
        for index, spec in specs:
            for position, need in enumerate(spec.needs or ()):
                if need not in needs:
                    hint = _did_you_mean(need, needs)
                    self._problem(
                        ("nodes", index, "needs", position),
                        "unknown-need",
                        f"node {spec.id!r} needs {need!r}, which is not a node of this flow{hint}",
                    )
        cycle = find_cycle(needs)
        if cycle:
            index = next(i for i, spec in specs if spec.id == cycle[0])
            self._problem(("nodes", index, "needs"), "cycle", f"nodes form a cycle: {' -> '.join(cycle)}")
        return needs

    def _build_nodes(
        self, specs: list[tuple[int, NodeSpec]], needs: dict[str, tuple[str, ...]]
    ) -> Iterable[tuple[str, FlowNode | None]]:
        for index, spec in specs:
            yield spec.id, self._build_node(index, spec, needs)

    def _build_node(self, index: int, spec: NodeSpec, needs: dict[str, tuple[str, ...]]) -> FlowNode | None:
        base: DocPath = ("nodes", index)
        cls = self._node_type(base, spec)
        if cls is not None:
            self._check_config(cls.Config, spec.with_, (*base, "with"))
            self._check_services(cls, (*base, "type"))
            self._check_schema_files(cls.Config, spec.with_, (*base, "with"))
        template_errors: list[tuple[DocPath, TemplateError]] = []
        config = compile_tree(spec.with_, (*base, "with"), template_errors)
        if cls is not None:
            config = _text_fields(config, _config_schema(cls.Config))
        when = self._compile_when(spec.when, (*base, "when"), template_errors)
        for path, error in template_errors:
            self._problem(path, error.code, f"node {spec.id!r}: {error.message}")
        templates = list(iter_templates(config, (*base, "with")))
        templates_in_config = bool(templates)
        if isinstance(when, Template):
            templates.append(((*base, "when"), when))
        self._check_references(spec.id, templates, needs)
        if cls is None:
            return None
        return FlowNode(
            id=spec.id,
            type=spec.type,
            node=cls(),
            config=config,
            needs=needs[spec.id],
            when=when,
            retry=merge_retry(cls.retry, spec.retry),
            timeout=spec.timeout if spec.timeout is not None else cls.timeout,
            static_config=None if templates_in_config else _static_config(cls.Config, spec.with_),
        )

    def _node_type(self, base: DocPath, spec: NodeSpec) -> Any:
        cls = self.registry.get(spec.type)
        if cls is not None or not spec.type:
            return cls
        if spec.type in self.registry.conflicts:
            self._problem((*base, "type"), "node-type-conflict", self.registry.conflicts[spec.type].message)
            return None
        if spec.type in self.registry.unregistered:
            self._problem((*base, "type"), "unknown-node-type", self.registry.unregistered[spec.type].message)
            return None
        hint = _did_you_mean(spec.type, self.registry.names())
        broken = "".join(
            f"; note: {error.message}" for error in self.registry.errors if error.code == "plugin-import-failed"
        )
        self._problem((*base, "type"), "unknown-node-type", f"unknown node type {spec.type!r}{hint}{broken}")
        return None

    def _check_services(self, cls: Any, path: DocPath) -> None:
        for name in cls.services:
            if name not in self.registry.services:
                message = (
                    f"node type {cls.type!r} needs the service {name!r}, which no installed package provides "
                    f"(a `flowchat.services` entry point)"
                )
                self._problem(path, "service-missing", message)

    def _check_config(self, config_model: type[BaseModel], raw: dict[str, Any], base: DocPath) -> None:
        try:
            config_model.model_validate(raw)
        except ValidationError as exc:
            for error in exc.errors():
                path = _data_path(raw, error["loc"])
                if error["type"] != "extra_forbidden" and _is_templated(raw, path):
                    continue  # checked once rendered, at run time
                self._pydantic_problem(error, (*base, *path))

    def _check_schema_files(self, config_model: type[BaseModel], raw: dict[str, Any], base: DocPath) -> None:
        """Fields typed SchemaFile: confined to the flow's folder, a regular JSON Schema file, read now."""
        properties = _config_schema(config_model).get("properties", {})
        for key, value in raw.items():
            if not (isinstance(properties.get(key), dict) and _marks_schema_file(properties[key])):
                continue
            if value is None:
                continue
            try:
                read_schema_file(Path(self.document.file).parent, value if isinstance(value, str) else "")
            except ValueError as exc:
                self._problem((*base, key), "schema-file-invalid", str(exc))

    def _compile_when(
        self, when: str | bool | None, path: DocPath, errors: list[tuple[DocPath, TemplateError]]
    ) -> Template | bool | None:
        if not isinstance(when, str):
            return when
        try:
            return compile_expression(when)
        except TemplateError as exc:
            errors.append((path, exc))
            return None

    def _check_references(
        self, node_id: str, templates: list[tuple[DocPath, Template]], needs: dict[str, tuple[str, ...]]
    ) -> None:
        reads_nodes = any(template.names - CONTEXT_NAMES for _, template in templates)
        upstream = ancestors(needs, node_id) if reads_nodes else frozenset()
        flow_vars = _at(self.document.data, ("vars",))
        known_vars = list(flow_vars) if isinstance(flow_vars, dict) else []
        for path, template in templates:
            for key in sorted(template.var_keys - set(known_vars)):
                hint = _did_you_mean(key, known_vars)
                self._problem(
                    path, "template-unknown-var", f"node {node_id!r} reads vars.{key}, which the flow's vars lack{hint}"
                )
            for name in sorted(template.names - CONTEXT_NAMES - upstream):
                if name in needs:
                    why = "itself" if name == node_id else "a node that is not upstream of it (add it to needs)"
                    self._problem(path, "template-not-upstream", f"node {node_id!r} reads {name!r}, {why}")
                else:
                    hint = _did_you_mean(name, [*CONTEXT_NAMES, *upstream])
                    self._problem(path, "template-unknown-name", f"node {node_id!r} reads unknown name {name!r}{hint}")

    # --- helpers ----------------------------------------------------------------

    def _validate(self, model: type[M], raw: Any, base: DocPath) -> M | None:
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            for error in exc.errors():
                self._pydantic_problem(error, (*base, *_data_path(_at(self.document.data, base), error["loc"])))
            return None

    def _pydantic_problem(self, error: Any, path: DocPath) -> None:
        kind = error["type"]
        if kind == "union_tag_invalid":
            allowed = error.get("ctx", {}).get("expected_tags", "")
            given = error.get("ctx", {}).get("tag", "")
            message = f"{dotted((*path, 'type'))}: unknown type {given!r}; expected one of {allowed}"
            self._problem((*path, "type"), "invalid-value", message)
        elif kind == "union_tag_not_found":
            self._problem(path, "missing-key", f"{dotted((*path, 'type'))}: required key 'type' is missing")
        elif kind == "extra_forbidden":
            self._problem(path, "unknown-key", f"{dotted(path)}: unknown key {path[-1]!r}", key=True)
        elif kind == "missing":
            self._problem(path, "missing-key", f"{dotted(path)}: required key {path[-1]!r} is missing")
        else:
            self._problem(path, "invalid-value", f"{dotted(path)}: {error['msg']}")

    def _problem(self, path: DocPath, code: str, message: str, *, key: bool = False) -> None:
        self.problems.append(self.document.error(path, code, message, key=key))


def _count_templates(value: Any) -> int:
    stack, count = [value], 0
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif is_template(item):
            count += 1
    return count


def _marks_schema_file(schema: dict[str, Any]) -> bool:
    return bool(schema.get(SCHEMA_FILE_MARK)) or any(
        isinstance(branch, dict) and branch.get(SCHEMA_FILE_MARK) for branch in schema.get("anyOf", [])
    )


@functools.lru_cache(maxsize=256)  # one entry per node type (bounded); callers only read it
def _config_schema(config_model: type[BaseModel]) -> dict[str, Any]:
    try:
        return config_model.model_json_schema()
    except Exception:  # a config type without a JSON Schema: no string fields known
        return {}


def _text_fields(value: Any, schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """Mark templates in string-typed fields so a number they render becomes its string."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if isinstance(value, Template):
        return value.as_text() if _is_text(schema, defs) else value
    if isinstance(value, dict):
        return {key: _text_fields(item, _child(schema, key, defs), defs) for key, item in value.items()}
    if isinstance(value, list):
        return [_text_fields(item, _child(schema, index, defs), defs) for index, item in enumerate(value)]
    return value


def _deref(schema: Any, defs: dict[str, Any]) -> dict[str, Any]:
    for _ in range(8):
        if not isinstance(schema, dict):
            return {}
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
            return schema
        schema = defs.get(ref.removeprefix("#/$defs/"), {})
    return {}


def _branches(schema: Any, defs: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _deref(schema, defs)
    return [schema, *(_deref(branch, defs) for branch in schema.get("anyOf", []) + schema.get("oneOf", []))]


def _is_text(schema: dict[str, Any], defs: dict[str, Any]) -> bool:
    types = {branch.get("type") for branch in _branches(schema, defs)} - {None, "null"}
    return types == {"string"}


def _child(schema: dict[str, Any], key: str | int, defs: dict[str, Any]) -> dict[str, Any]:
    for branch in _branches(schema, defs):
        if isinstance(key, str) and key in branch.get("properties", {}):
            return dict(branch["properties"][key])
        if isinstance(key, str) and isinstance(branch.get("additionalProperties"), dict):
            return dict(branch["additionalProperties"])
        if isinstance(key, int) and isinstance(branch.get("items"), dict):
            return dict(branch["items"])
    return {}


def _static_config(config_model: type[BaseModel], raw: dict[str, Any]) -> BaseModel | None:
    try:
        return config_model.model_validate(raw)
    except ValidationError:
        return None  # already reported by _check_config


def _known_keys_only(raw: Any) -> NodeSpec | None:
    """The node without its unknown keys, so its other parts still get checked."""
    if not isinstance(raw, dict):
        return None
    known = {field.alias or name for name, field in NodeSpec.model_fields.items()}
    try:
        # a missing type is already reported; keep the node so its neighbours' checks stay right
        return NodeSpec.model_validate({"type": "", **{key: value for key, value in raw.items() if key in known}})
    except ValidationError:
        return None


def _at(data: Any, path: DocPath) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _data_path(data: Any, loc: tuple[Any, ...]) -> DocPath:
    """Pydantic's ``loc`` with the parts that are not real keys (union tags) dropped."""
    path: list[str | int] = []
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        elif not (last and isinstance(data, dict)):
            continue
        path.append(part)
    return tuple(path)


def _is_templated(raw: Any, path: DocPath) -> bool:
    value = raw
    for part in path:
        if is_template(value):
            return True
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return False
    return is_template(value)


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def merge_retry(defaults: RetryPolicy, declared: RetryPolicy | None) -> RetryPolicy:
    """A node's ``retry:`` over its type's defaults, field by field: ``{backoff: 5s}`` keeps ``max_attempts``."""
    if declared is None:
        return defaults
    return defaults.model_copy(update={name: getattr(declared, name) for name in declared.model_fields_set})
