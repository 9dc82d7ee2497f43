"""Log lines with a fixed shape, execution and node ids, and masked phone numbers.

Shape: ``<execution> <node> <arrow> <what>`` where the arrow is ``→`` (start),
``←`` (done), ``↻`` (retry) or ``!`` (failure). Phone numbers are masked in
every record (``+1415***4567``) and secret values never reach a handler.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from flowchat.settings import secret_values

_SEP = r"[\s.-]?"
_PHONE = re.compile(
    r"(?<![\w+%])(?:"
    rf"(?P<plus>\+|%2[Bb])(?P<e164>\d(?:{_SEP}\d){{8,14}})"  # E.164, spaced or not, URL-encoded too
    rf"|(?P<national>\(?\d{{3}}\)?{_SEP}\d{{3}}{_SEP}\d{{4,5}})"  # 415 555 0123, (415) 555-0123, 4155550123
    r")(?![\d])"
)

_CANDIDATE = re.compile(r"(?<![\w])(?:\+|%2[Bb]|\()?\d[\d\s().-]{5,}\d")
"""Cheap pre-filter: a run of at least 7 digits with separators; only these reach phonenumbers."""
_region = ""


def set_default_region(region: str) -> None:
    """The region national numbers are read for (FLOWCHAT_DEFAULT_REGION, e.g. ``GB``)."""
    global _region
    _region = region.upper()


def mask_phones(text: str, region: str | None = None) -> str:
    """``+14155554567`` → ``+1415***4567``: enough to tell numbers apart, not to dial.

    E.164 numbers (``+`` or ``%2B`` then 9 to 15 digits, spaces, dots or dashes
    allowed between them) and US-style national numbers (``(415) 555-0123``) are
    masked by a regex; then numbers written with ``00`` or in the national format
    of ``region`` (default FLOWCHAT_DEFAULT_REGION: ``020 7946 0958`` for GB,
    ``06 12 34 56 78`` for FR) are found by ``phonenumbers``' matcher, run only on
    digit runs the cheap pre-filter finds. Order numbers, dates and timestamps
    are not phone numbers and stay.
    """
    text = _PHONE.sub(_mask, text)
    if not _CANDIDATE.search(text):
        return text
    return _CANDIDATE.sub(lambda match: _mask_candidate(match.group(0), region or _region), text)


_DATE = re.compile(r"\d{4}-\d\d-\d\d")


@functools.lru_cache(maxsize=1024)  # the same numbers recur in an execution's lines
def _mask_candidate(candidate: str, region: str) -> str:
    count = sum(char.isdigit() for char in candidate)
    if not 8 <= count <= 17 or _DATE.match(candidate):  # too short or long for a phone number, or a date
        return candidate
    import phonenumbers  # imported on first use: most processes never log a national number

    probe = "+" + candidate[2:].lstrip() if candidate.startswith("00") else candidate
    out: list[str] = []
    last = 0
    for match in phonenumbers.PhoneNumberMatcher(probe, region or "ZZ", leniency=phonenumbers.Leniency.VALID):
        offset = len(candidate) - len(probe)
        start, end = match.start + (offset if match.start else 0), match.end + offset
        digits = phonenumbers.format_number(match.number, phonenumbers.PhoneNumberFormat.E164)[1:]
        out.append(candidate[last:start])
        out.append(f"+{digits[:4]}***{digits[-4:]}")
        last = end
    out.append(candidate[last:])
    return "".join(out)


def _mask(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group("e164") or match.group("national"))
    head = f"+{digits[:4]}" if match.group("plus") else digits[:3]
    return f"{head}***{digits[-4:]}"


def redact(text: str, secrets: list[str]) -> str:
    """Phone numbers masked and secret values replaced, in any text bound for a log."""
    text = mask_phones(text)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


_FLOW_SECRETS: list[str] = []
"""Values of the flow secrets (``secrets.NAME``) of this process, however short: see add_secret_values."""


def add_secret_values(values: list[str]) -> None:
    """Mask these values in every log line from now on (the flow secrets, added by the runtime)."""
    # longest first, so a secret containing another is masked whole
    _FLOW_SECRETS[:] = sorted({*_FLOW_SECRETS, *(value for value in values if value)}, key=len, reverse=True)


class RedactingFilter(logging.Filter):
    """Masks phone numbers and secret values in a record's message (for any handler)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = secret_values()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), [*_FLOW_SECRETS, *self.secrets]), None
        return True


class RedactingFormatter(logging.Formatter):
    """Redacts the whole formatted line, tracebacks included (they are added after filters run).

    Times are ISO 8601 in UTC with their offset (``2026-11-30T10:46:00.939+00:00``).
    """

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self.secrets = secret_values()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return iso_utc(record.created)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), [*_FLOW_SECRETS, *self.secrets])


class JsonFormatter(RedactingFormatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` (+ ``traceback``), redacted."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("route", "status", "duration_ms", "execution_id", "method", "remote"):
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, ensure_ascii=False, default=str), [*_FLOW_SECRETS, *self.secrets])


def iso_utc(epoch: float) -> str:
    """``2026-11-30T10:46:00.939+00:00``: ISO 8601, UTC, milliseconds, explicit offset."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


class _ExecutionAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"{extra.get('execution')} {extra.get('node')} {msg}", kwargs


_EXECUTION_LOGGER = logging.getLogger("flowchat.execution")
_EXECUTION_LOGGER.addFilter(RedactingFilter())  # masked for every handler, not only ours


def logger_for(execution_id: str, node_id: str) -> logging.LoggerAdapter[logging.Logger]:
    return _ExecutionAdapter(_EXECUTION_LOGGER, {"execution": execution_id, "node": node_id})


def current_log_format() -> str:
    """``json`` when the root handler writes JSON lines, else ``text`` (what a child process should use)."""
    handlers = logging.getLogger().handlers
    return "json" if handlers and isinstance(handlers[0].formatter, JsonFormatter) else "text"


def configure_logging(level: int | str = logging.INFO, log_format: str = "text", *, region: str = "") -> None:
    """Root logging for the CLI and daemon (``text`` or ``json`` lines on stderr), redacted on every handler.

    ``region`` (FLOWCHAT_DEFAULT_REGION) is where national phone numbers are read for masking.
    """
    set_default_region(region)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
