"""The node SDK: what a plugin author writes.

A node is a class with a pydantic ``Config`` and one ``async def run(ctx, config)``
that returns a JSON-able dict, marked with :func:`register`::

    from flowchat import Node, NodeConfig, NodeContext, register

    @register
    class Shout(Node):
        \"\"\"Upper-case a text.\"\"\"

        type = "text.shout"

        class Config(NodeConfig):
            text: str

        async def run(self, ctx: NodeContext, config: Config) -> dict:
            return {"text": config.text.upper()}

The config's JSON Schema is derived from the class; it feeds load-time
validation, ``flowchat nodes`` and ``flowchat schema``.
"""

from __future__ import annotations

import builtins
import inspect
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from flowchat.durations import Duration
from flowchat.errors import PluginError
from flowchat.logs import logger_for
from flowchat.services import Services

_REGISTERED = "__flowchat_node__"


class NodeConfig(BaseModel):
    """Base for node configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class RetryPolicy(BaseModel):
    """``retry: {max_attempts, backoff, max_backoff}`` of a node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(1, ge=1, le=100, description="Attempts in all, the first included.")
    backoff: Duration = Field(
        1.0, description="Base wait before the second attempt (jittered to half..full); doubles each time."
    )
    max_backoff: Duration = Field(300.0, description="Longest wait between attempts.")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed ``attempt`` (1-based): exponential, equal jitter."""
        ceiling: float = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        wait = ceiling / 2 + random.uniform(0, ceiling / 2)
        # honour Retry-After, but a server cannot park an execution longer than max_backoff
        return max(wait, min(retry_after or 0.0, self.max_backoff))


class Suspend(Exception):
    """Raised by a node to be run again at ``until`` (epoch seconds), holding no worker."""

    def __init__(self, until: float) -> None:
        super().__init__(f"suspended until {until}")
        self.until = until


@dataclass
class NodeContext:
    """Everything a running node may use besides its config."""

    flow: str
    execution_id: str
    node_id: str
    attempt: int
    trigger: dict[str, Any]
    vars: dict[str, Any]
    services: Services
    first_started_at: float
    flow_dir: Path = Path(".")
    first_run: bool = False
    """True when no earlier attempt of this node can have run in this execution: its first attempt,
    in the execution's first delivery. A node that keeps a record of its side effect (``whatsapp.send``)
    need not read the record then. (A node that raises :class:`Suspend` *after* its side effect must
    not rely on it: waiting does not count as an attempt.)"""

    def now(self) -> float:
        return self.services.clock()

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry the execution and node ids (phone numbers masked)."""
        return logger_for(self.execution_id, self.node_id)


class Node:
    """Base class of every node type."""

    type: ClassVar[str]
    Config: ClassVar[builtins.type[BaseModel]] = NodeConfig
    retry: ClassVar[RetryPolicy] = RetryPolicy()
    timeout: ClassVar[float] = 30.0
    pure: ClassVar[bool] = False
    """True for nodes that do no I/O and have no side effects (``set``, ``log``): they run
    without a timeout timer, and their checkpoint rides with the next write, so after a
    crash they may simply run again."""
    idempotent: ClassVar[bool] = False
    """True for nodes whose effect is the same whether they run once or again with the same
    config (``contact.upsert`` sets fields; ``whatsapp.send`` sends once per execution and
    node): their checkpoint, like a pure node's, rides with the next write, so after a crash
    they may run again. Pure nodes are idempotent."""
    instant: ClassVar[bool] = False
    """Deprecated alias of :attr:`pure` (plugins written before the rename set it)."""
    services: ClassVar[tuple[str, ...]] = ()
    """Names of the services ``run`` reaches through ``ctx.services.get``: a flow using this
    node is refused at load time where one of them is not installed."""

    async def run(self, ctx: NodeContext, config: Any) -> dict[str, Any]:
        """Do the node's work and return its output; the one method a node type implements.

        ``config`` is an instance of the class's ``Config``, its templates already rendered
        against the trigger, ``vars`` and upstream outputs; ``ctx`` gives the execution and
        node ids, the attempt number, a logger and ``ctx.services`` (HTTP session, clock,
        named services). Return a dict (or None for ``{}``): it is converted to plain JSON
        at once (:func:`flowchat.codec.node_output` — str keys, lists, ISO-8601 datetimes,
        lower-case header names) and checked against the output size limit; what cannot
        be converted fails the node with ``node-output-invalid``.

        Raise :class:`~flowchat.errors.RetryableError` for a transient failure (tried again
        per the node's ``retry`` policy), :class:`~flowchat.errors.NodeError` for a final
        one, or :class:`Suspend` to be run again later without holding a worker. Any other
        exception fails the node as ``node-crashed``. The node runs under its ``timeout``
        (pure nodes excepted) and must not block the event loop: run blocking code with
        ``await asyncio.to_thread(...)``.
        """
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls)
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def config_schema(cls) -> dict[str, Any]:
        return cls.Config.model_json_schema()


N = TypeVar("N", bound=type[Node])


def register(cls: N) -> N:
    """Declare ``cls`` a node type; mistakes in its declaration fail right here."""
    name = getattr(cls, "__qualname__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Node)):
        raise PluginError(f"{name} must subclass flowchat.Node", code="plugin-invalid-node")
    node_type = cls.__dict__.get("type")
    if not isinstance(node_type, str) or not node_type:
        raise PluginError(f"{name} must set a `type` string", code="plugin-invalid-node")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, BaseModel)):
        raise PluginError(f"{name}.Config must be a pydantic model", code="plugin-invalid-node")
    if cls.Config.model_config.get("extra") != "forbid":
        raise PluginError(f"{name}.Config must forbid extra keys (subclass NodeConfig)", code="plugin-invalid-node")
    if not inspect.iscoroutinefunction(cls.run) or cls.run is Node.run:
        raise PluginError(f"{name}.run must be an `async def`", code="plugin-invalid-node")
    if "instant" in cls.__dict__ and "pure" not in cls.__dict__:
        warnings.warn(f"{name}: `instant` is deprecated, set `pure = True` instead", DeprecationWarning, stacklevel=2)
        cls.pure = cls.instant
    cls.instant = cls.pure  # readers of the old name see the same answer
    if not (isinstance(cls.services, tuple) and all(isinstance(name, str) and name for name in cls.services)):
        raise PluginError(f"{name}.services must be a tuple of service names", code="plugin-invalid-node")
    setattr(cls, _REGISTERED, True)
    return cls


def is_registered(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, Node) and value.__dict__.get(_REGISTERED, False)
