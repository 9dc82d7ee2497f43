"""FlowChat: a reactive, low-code flow engine for WhatsApp CRM automation.

The public surface for plugin authors and embedders. Built-in nodes in
``nodes/`` use exactly this surface and nothing else.
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
    "load_flow",
    "load_flows",
    "load_registry",
    "open_services",
]
