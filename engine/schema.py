"""The JSON Schema of a flow file, including every node type's ``with``.

Editors (the YAML language server) use it to autocomplete and check flows::

    # yaml-language-server: $schema=./flowchat.schema.json

The schema of the built-in node types ships inside the package as
``flowchat/flow.schema.json`` (:func:`packaged_schema`), with the stable ``$id``
:data:`FLOW_SCHEMA_ID`; ``flowchat schema`` prints the one for the node types in
effect (built-ins, installed plugins and the plugins folder).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from flowchat.registry import Registry
from flowchat.spec import FlowSpec, NodeSpec

FLOW_SCHEMA_ID = "urn:flowchat-engine:schema:flow:1"
"""The ``$id`` of every flow schema FlowChat writes: it names the format, version 1."""
PACKAGED_SCHEMA = "flow.schema.json"

TEMPLATE_STRING = {"type": "string", "pattern": r"\{[{%]", "description": "A Jinja2 template."}


def flow_schema(registry: Registry) -> dict[str, Any]:
    """A draft 2020-12 schema of flow files for the node types in ``registry``."""
    schema = FlowSpec.model_json_schema(by_alias=True, mode="validation")
    definitions: dict[str, Any] = schema.setdefault("$defs", {})
    node = NodeSpec.model_json_schema(by_alias=True, mode="validation")
    _merge_defs(definitions, node, prefix="")
    node["properties"]["type"] = {
        "enum": registry.names(),
        "description": node["properties"]["type"].get("description", ""),
    }
    node["allOf"] = [_node_type_rule(name, registry, definitions) for name in registry.names()]
    schema["properties"]["nodes"]["items"] = node
    schema.pop("title", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": FLOW_SCHEMA_ID,
        "title": "FlowChat flow",
        **schema,
    }


def packaged_schema() -> dict[str, Any]:
    """The flow schema of the built-in node types, as shipped in the package."""
    text = resources.files("flowchat").joinpath(PACKAGED_SCHEMA).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _node_type_rule(name: str, registry: Registry, definitions: dict[str, Any]) -> dict[str, Any]:
    cls = registry.types[name]
    config = cls.Config.model_json_schema(by_alias=True, mode="validation")
    _merge_defs(definitions, config, prefix=f"{name}.")
    config["properties"] = {
        key: {"anyOf": [value, TEMPLATE_STRING]} for key, value in config.get("properties", {}).items()
    }
    config["description"] = cls.summary()
    return {
        "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
        "then": {"properties": {"with": config}},
    }


def _merge_defs(definitions: dict[str, Any], schema: dict[str, Any], prefix: str) -> None:
    """Move ``schema``'s $defs into the root's, renaming refs so they stay unique."""
    local = schema.pop("$defs", {})
    renamed = {key: f"{prefix}{key}" for key in local}
    for key, value in local.items():
        definitions[renamed[key]] = _rename_refs(value, renamed)
    schema.update(_rename_refs(schema, renamed))


def _rename_refs(value: Any, renamed: dict[str, str]) -> Any:
    if isinstance(value, dict):
        result = {key: _rename_refs(item, renamed) for key, item in value.items()}
        ref = result.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[8:] in renamed:
            result["$ref"] = f"#/$defs/{renamed[ref[8:]]}"
        return result
    if isinstance(value, list):
        return [_rename_refs(item, renamed) for item in value]
    return value


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"
