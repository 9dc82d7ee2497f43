"""Field types for node configs and flow specs, beyond what pydantic has."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Annotated, Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import AfterValidator, WithJsonSchema


def check_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Refuse a dict that is not a valid JSON Schema (draft 2020-12)."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from exc
    return schema


JsonSchema = Annotated[dict[str, Any], AfterValidator(check_json_schema)]
"""A pydantic field type: a JSON Schema, checked when the flow loads."""


MAX_SCHEMA_FILE_BYTES = 1024 * 1024
"""Largest ``schema_file`` read (1 MiB)."""
SCHEMA_FILE_MARK = "x-flowchat-schema-file"
"""Marks a config field holding a schema file name in the node's JSON Schema (the loader checks these)."""

SchemaFile = Annotated[str, WithJsonSchema({"type": "string", SCHEMA_FILE_MARK: True})]
"""A pydantic field type: a JSON Schema file in the flow's folder, read and checked when the flow loads."""


def read_schema_file(flow_dir: Path, name: str) -> dict[str, Any]:
    """The JSON Schema in ``name``, a regular file inside ``flow_dir`` (its folder or below).

    Raises ValueError saying why not: a template, a path leaving the folder, not a
    regular file (a device, a FIFO), over MAX_SCHEMA_FILE_BYTES, not JSON, not a schema.
    """
    if "{{" in name or "{%" in name:
        raise ValueError("schema_file may not be a template: it is read when the flow loads")
    root = flow_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"schema_file {name!r} is outside the flow's folder {root}")
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"schema_file {name!r} is not a regular file")
        if info.st_size > MAX_SCHEMA_FILE_BYTES:
            raise ValueError(f"schema_file {name!r} is over the limit of {MAX_SCHEMA_FILE_BYTES} bytes")
        with path.open("rb") as file:
            data = file.read(MAX_SCHEMA_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read schema_file {name!r}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SCHEMA_FILE_BYTES:
        raise ValueError(f"schema_file {name!r} is over the limit of {MAX_SCHEMA_FILE_BYTES} bytes")
    try:
        schema = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"schema_file {name!r} is not JSON: {exc}") from exc
    if not isinstance(schema, dict | bool):
        raise ValueError(f"schema_file {name!r} does not hold a JSON Schema")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"schema_file {name!r} is not a valid JSON Schema: {exc.message}") from exc
    return schema if isinstance(schema, dict) else {"not": {}} if not schema else {}
