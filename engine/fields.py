"""Field types for node configs and flow specs, beyond what pydantic has."""

from __future__ import annotations

from typing import Annotated, Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import AfterValidator


def check_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Refuse a dict that is not a valid JSON Schema (draft 2020-12)."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from exc
    return schema


JsonSchema = Annotated[dict[str, Any], AfterValidator(check_json_schema)]
"""A pydantic field type: a JSON Schema, checked when the flow loads."""
