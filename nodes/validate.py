"""``validate``: check data against a JSON Schema (draft 2020-12)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator
from pydantic import Field, model_validator

from flowchat import JsonSchema, Node, NodeConfig, NodeContext, NodeError, SchemaFile, read_schema_file, register


@register
class Validate(Node):
    """Validate data against a JSON Schema; output {valid, errors} with each error's JSON path."""

    type = "validate"
    pure = True

    class Config(NodeConfig):
        data: Any = Field(None, description="What to validate; defaults to the trigger payload.")
        schema_: JsonSchema | None = Field(None, alias="schema", description="Inline JSON Schema (2020-12).")
        schema_file: SchemaFile | None = Field(
            None, description="JSON Schema file in the flow's folder (or below), read when the flow loads."
        )
        on_invalid: Literal["fail", "continue"] = Field("fail", description="Fail the node, or output valid: false.")

        @model_validator(mode="after")
        def _one_schema(self) -> Validate.Config:
            if (self.schema_ is None) == (self.schema_file is None):
                raise ValueError("give exactly one of schema or schema_file")
            return self

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        validator = _validator_for(config.schema_, config.schema_file, ctx.flow_dir)
        data = ctx.trigger if config.data is None else config.data
        errors = [
            {"path": error.json_path, "message": error.message}
            for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        ]
        if errors and config.on_invalid == "fail":
            listed = "; ".join(f"{e['path']}: {e['message']}" for e in errors)
            raise NodeError(f"{len(errors)} validation error(s): {listed}", code="validation-failed")
        return {"valid": not errors, "errors": errors}


_INLINE: dict[int, tuple[dict[str, Any], Draft202012Validator]] = {}
"""Validators of inline schemas by the schema's identity: a config without templates is built once per
flow load, so its schema is the same dict on every run (the entry holds it, so its id is not reused)."""


def _validator_for(schema: dict[str, Any] | None, schema_file: str | None, flow_dir: Path) -> Draft202012Validator:
    if schema is not None:
        found = _INLINE.get(id(schema))
        if found is None or found[0] is not schema:
            if len(_INLINE) >= 256:  # rendered schemas are new dicts each run: keep the cache bounded
                _INLINE.clear()
            found = _INLINE[id(schema)] = (schema, Draft202012Validator(schema))
        return found[1]
    path = (flow_dir / str(schema_file)).resolve()
    try:
        mtime_ns = path.stat().st_mtime_ns
    except OSError:
        mtime_ns = 0
    return _file_validator(flow_dir, str(schema_file), mtime_ns)


@lru_cache(maxsize=64)
def _file_validator(flow_dir: Path, name: str, mtime_ns: int) -> Draft202012Validator:
    try:
        return Draft202012Validator(read_schema_file(flow_dir, name))
    except ValueError as exc:
        raise NodeError(str(exc), code="schema-file-invalid") from exc
