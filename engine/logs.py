"""Log lines with a fixed shape, execution and node ids, and masked phone numbers.

Shape: ``<execution> <node> <arrow> <what>`` where the arrow is ``→`` (start),
``←`` (done), ``↻`` (retry) or ``!`` (failure). Phone numbers are masked in
every record (``+1415***4567``) and secret values never reach a handler.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

_PHONE = re.compile(
    r"(?<![\w+])"
    r"(?:(?P<head>\+\d{4})\d{1,7}"  # E.164: + and 9 to 15 digits
    r"|(?P<national>\d{3})\d{3,4})"  # national: 10 or 11 bare digits
    r"(?P<tail>\d{4})(?!\d)"
)
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


def mask_phones(text: str) -> str:
    """``+14155554567`` → ``+1415***4567``: enough to tell numbers apart, not to dial.

    E.164 numbers (a ``+`` and 9 to 15 digits) and national numbers (10 or 11 bare
    digits) are masked; shorter and longer digit runs (order numbers, millisecond
    timestamps) are left alone.
    """
    return _PHONE.sub(lambda m: f"{m['head'] or m['national']}***{m['tail']}", text)


def _secret_values() -> list[str]:
    return [
        value
        for name, value in os.environ.items()
        if len(value) >= 8 and any(marker in name.upper() for marker in SECRET_MARKERS)
    ]


class RedactingFilter(logging.Filter):
    """Masks phone numbers and the values of secret environment variables."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = _secret_values()

    def filter(self, record: logging.LogRecord) -> bool:
        message = mask_phones(record.getMessage())
        for secret in self.secrets:
            message = message.replace(secret, "***")
        record.msg, record.args = message, None
        return True


class _ExecutionAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"{extra.get('execution')} {extra.get('node')} {msg}", kwargs


_EXECUTION_LOGGER = logging.getLogger("flowchat.execution")
_EXECUTION_LOGGER.addFilter(RedactingFilter())  # masked for every handler, not only ours


def logger_for(execution_id: str, node_id: str) -> logging.LoggerAdapter[logging.Logger]:
    return _ExecutionAdapter(_EXECUTION_LOGGER, {"execution": execution_id, "node": node_id})


def configure_logging(level: int | str = logging.INFO) -> None:
    """Root logging for the CLI and daemon, with redaction on every handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
