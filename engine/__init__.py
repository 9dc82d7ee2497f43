"""FlowChat: a reactive, low-code flow engine for WhatsApp CRM automation.

Two public surfaces live here. :data:`PLUGIN_API` is what node plugins (and
the built-in nodes in ``nodes/``, which a test holds to it) may import: the
node SDK, its errors, ``Settings`` and ``Services`` for service factories; their
tests add :mod:`flowchat.testing`. The rest of ``__all__`` is the embedding
API, for programs that load and run flows themselves.
"""

from flowchat.durations import Duration, parse_duration
from flowchat.errors import (
    FlowChatError,
    FlowError,
    FlowInvalid,
    Location,
    NodeConfigError,
    NodeError,
    NodeTimeout,
    PluginError,
    QueueError,
    RetryableError,
    TemplateError,
    TemplateSecurityError,
)
from flowchat.execution import Execution, NodeRun
from flowchat.fields import JsonSchema, SchemaFile, read_schema_file
from flowchat.flow import Flow
from flowchat.loader import load_flow, load_flows
from flowchat.logs import mask_phones
from flowchat.node import Node, NodeConfig, NodeContext, RetryPolicy, Suspend, register
from flowchat.registry import Registry, load_registry
from flowchat.runner import Runner
from flowchat.services import Services, open_services
from flowchat.settings import Settings

PLUGIN_API = (
    "Duration",
    "JsonSchema",
    "Node",
    "NodeConfig",
    "NodeContext",
    "NodeError",
    "RetryPolicy",
    "RetryableError",
    "Services",
    "Settings",
    "SchemaFile",
    "Suspend",
    "mask_phones",
    "read_schema_file",
    "register",
)
"""Names plugins import from ``flowchat``: stable across minor versions."""

__all__ = [
    # writing nodes
    "Node",
    "NodeConfig",
    "NodeContext",
    "RetryPolicy",
    "Duration",
    "JsonSchema",
    "SchemaFile",
    "read_schema_file",
    "Suspend",
    "register",
    "parse_duration",
    "mask_phones",
    # errors
    "FlowChatError",
    "FlowError",
    "FlowInvalid",
    "Location",
    "NodeConfigError",
    "NodeError",
    "NodeTimeout",
    "PluginError",
    "QueueError",
    "RetryableError",
    "TemplateError",
    "TemplateSecurityError",
    # loading and running flows
    "Execution",
    "Flow",
    "NodeRun",
    "Registry",
    "Runner",
    "Services",
    "Settings",
    "PLUGIN_API",
    "load_flow",
    "load_flows",
    "load_registry",
    "open_services",
]
