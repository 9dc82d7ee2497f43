"""FlowChat: a reactive, low-code flow engine for WhatsApp CRM automation.

The public surface for plugin authors and embedders. Built-in nodes in
``nodes/`` use exactly this surface and nothing else.
"""

from engine.durations import Duration, parse_duration
from engine.errors import (
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
from engine.execution import Execution, NodeRun
from engine.fields import JsonSchema
from engine.flow import Flow
from engine.loader import load_flow, load_flows
from engine.logs import mask_phones
from engine.node import Node, NodeConfig, NodeContext, RetryPolicy, Suspend, register
from engine.registry import Registry, load_registry
from engine.runner import Runner
from engine.services import Services, open_services

__all__ = [
    # writing nodes
    "Node",
    "NodeConfig",
    "NodeContext",
    "RetryPolicy",
    "Duration",
    "JsonSchema",
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
