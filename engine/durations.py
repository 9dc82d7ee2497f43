"""Durations as flow authors write them: ``500ms``, ``2s``, ``10m``, ``24h``, ``7d``."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
DURATION_REGEX = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$"


def parse_duration(value: Any) -> float:
    """Return seconds for ``value``: a number of seconds or a string like ``2s``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500ms, 2s, 10m or 24h, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a duration like 500ms, 2s, 10m or 24h, got {value!r}")


def format_duration(seconds: float) -> str:
    """Render seconds the way an author would write them."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_REGEX},
                {"type": "number", "minimum": 0},
            ],
            "description": "A duration: 500ms, 2s, 10m, 24h, 7d, or seconds as a number.",
        }
    ),
]
"""A pydantic field type: seconds as a float, written as ``2s`` in YAML."""
