"""FlowChat's one error hierarchy.

Every error carries a stable ``code``, a human ``message``, whether it is
``retryable``, and a ``location``: where in a flow file it was found (load
time) or which execution, node and attempt raised it (run time)::

    FlowChatError
    ├── FlowError              load time: one problem in a flow file
    ├── FlowInvalid            load time: every problem of one or more files
    ├── PluginError            a node module failed to import or clashes
    ├── TemplateError          a template failed to render
    │   └── TemplateSecurityError   a template reached for something unsafe
    ├── NodeError              a node failed while running
    │   ├── RetryableError     try again later (optionally after ``retry_after``)
    │   ├── NodeConfigError    rendered ``with`` does not fit the node's Config
    │   └── NodeTimeout        the node ran past its ``timeout``
    └── QueueError             the durable queue could not be reached

Foreign exceptions are translated at the boundary with ``raise … from exc``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Location:
    """Where an error happened: a file position, a run position, or both."""

    file: str | None = None
    line: int | None = None
    col: int | None = None
    path: str | None = None
    flow: str | None = None
    execution: str | None = None
    node: str | None = None
    attempt: int | None = None

    def __str__(self) -> str:
        if self.file is not None:
            return f"{self.file}:{self.line or 1}:{self.col or 1}"
        parts = [
            f"{name}={value}"
            for name, value in (
                ("flow", self.flow),
                ("execution", self.execution),
                ("node", self.node),
                ("attempt", self.attempt),
            )
            if value is not None
        ]
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


class FlowChatError(Exception):
    """Base of every FlowChat error."""

    code: str = "error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        location: Location | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.location = location or Location()

    def at(self, **where: Any) -> FlowChatError:
        """Return this error with its location filled in further."""
        self.location = replace(self.location, **where)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "location": self.location.to_dict(),
        }

    def __str__(self) -> str:
        where = str(self.location)
        return f"{where}: [{self.code}] {self.message}" if where else f"[{self.code}] {self.message}"


class FlowError(FlowChatError):
    """One problem found in a flow file at load time."""

    code = "flow-invalid"


class FlowInvalid(FlowChatError):
    """Every problem found while loading flows, reported at once."""

    code = "flows-invalid"

    def __init__(self, errors: list[FlowChatError]) -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} problem(s) found")

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


class PluginError(FlowChatError):
    """A node module failed to import, or declares a type that already exists."""

    code = "plugin-error"


class TemplateError(FlowChatError):
    """A template failed to render (undefined name, bad operation)."""

    code = "template-error"


class TemplateSecurityError(TemplateError):
    """A template reached for an attribute or call the sandbox forbids."""

    code = "template-unsafe"


class NodeError(FlowChatError):
    """A node failed. Raise it (or a subclass) from ``Node.run``."""

    code = "node-failed"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        location: Location | None = None,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable, location=location)
        self.retry_after = retry_after


class RetryableError(NodeError):
    """A transient failure: the node is tried again after a backoff."""

    code = "retryable"
    retryable = True


class NodeConfigError(NodeError):
    """The rendered ``with`` of a node does not fit its Config."""

    code = "node-config-invalid"


class NodeTimeout(NodeError):
    """A node ran past its timeout."""

    code = "node-timeout"
    retryable = True


class QueueError(FlowChatError):
    """The durable queue (Redis) could not be reached or answered badly."""

    code = "queue-unavailable"
    retryable = True


def as_flowchat_error(exc: BaseException) -> FlowChatError:
    """Wrap an unexpected exception so nothing foreign reaches the trace."""
    if isinstance(exc, FlowChatError):
        return exc
    error = NodeError(f"{type(exc).__name__}: {exc}", code="node-crashed", retryable=False)
    error.__cause__ = exc
    return error
