"""Where node types come from: built-ins, pip packages and the plugins folder.

Built-ins and installed plugins are found the same way, through the entry point
group ``flowchat.nodes`` (the engine's own entries in pyproject.toml are the
built-ins); the plugins folder is read as files. Every source goes through
:meth:`Registry.load_source`: import a module, collect the classes marked with
:func:`flowchat.register`. A module that fails to import, a type declared twice,
a plugin claiming a built-in's type name, or a ``Node`` subclass left without
``@register`` is recorded as a :class:`PluginError` naming its source; flows that
need such a type are refused at load time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from flowchat.errors import PluginError
from flowchat.node import Node, is_registered
from flowchat.services import service_names
from flowchat.settings import Settings

ENTRY_POINT_GROUP = "flowchat.nodes"
ENGINE_DISTRIBUTION = "flowchat-engine"
"""The distribution whose ``flowchat.nodes`` entry points are the built-ins."""
PLUGINS_ENV = "FLOWCHAT_PLUGINS"


@dataclass
class Registry:
    """Node types by name, with the source each came from."""

    types: dict[str, type[Node]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    errors: list[PluginError] = field(default_factory=list)
    conflicts: dict[str, PluginError] = field(default_factory=dict)
    services: set[str] = field(default_factory=set)
    """Names of the services available to nodes (installed ``flowchat.services`` entry points)."""
    builtins: set[str] = field(default_factory=set)
    """Type names of the built-in nodes: no plugin may take one."""
    unregistered: dict[str, PluginError] = field(default_factory=dict)
    """Node classes found in plugin modules without ``@register``, by the type they set."""

    def get(self, node_type: str) -> type[Node] | None:
        return None if node_type in self.conflicts else self.types.get(node_type)

    def names(self) -> list[str]:
        return sorted(name for name in self.types if name not in self.conflicts)

    def add(self, cls: type[Node], source: str, *, builtin: bool = False) -> None:
        name = cls.type
        if name in self.builtins and self.types[name] is not cls:
            self._report(
                f"{source} declares node type {name!r}, which is the built-in from {self.sources[name]}; "
                "a plugin may not replace a built-in (choose another name, e.g. with a prefix)",
                "plugin-builtin-type",
            )
            return
        if name in self.types and self.types[name] is not cls:
            error = self._report(
                f"node type {name!r} is declared by both {self.sources[name]} and {source}", "plugin-duplicate-type"
            )
            self.conflicts[name] = error
            return
        self.types[name] = cls
        self.sources[name] = source
        if builtin:
            self.builtins.add(name)

    def _report(self, message: str, code: str) -> PluginError:
        error = PluginError(message, code=code)
        self.errors.append(error)
        return error

    def load_source(self, source: str, load: Any, *, builtin: bool = False) -> None:
        """Import through ``load()`` and register what it declares; record failures."""
        try:
            loaded = load()
        except Exception as exc:  # a plugin may raise anything while importing
            error = PluginError(f"{source} failed to import: {type(exc).__name__}: {exc}", code="plugin-import-failed")
            error.__cause__ = exc
            self.errors.append(error)
            return
        for cls in _declared_nodes(loaded):
            self.add(cls, source, builtin=builtin)
        for cls in _unregistered_nodes(loaded):
            error = self._report(
                f"{source}: class {cls.__qualname__} subclasses flowchat.Node but is not registered "
                "(mark it with @register)",
                "plugin-unregistered-node",
            )
            node_type = cls.__dict__.get("type")
            if isinstance(node_type, str) and node_type not in self.types:
                self.unregistered[node_type] = error

    def load_builtins(self) -> None:
        """The engine's own node types: its ``flowchat.nodes`` entry points, like any plugin's."""
        found = [ep for ep in _node_entry_points() if _distribution(ep) == ENGINE_DISTRIBUTION]
        if not found:
            self._report(
                f"no built-in node types: the {ENGINE_DISTRIBUTION} distribution's `flowchat.nodes` entry points "
                "are not installed (install the package, or re-run `pip install -e .` after editing pyproject.toml)",
                "plugin-builtins-missing",
            )
        for entry_point in found:
            self.load_source(f"built-in {entry_point.value}", entry_point.load, builtin=True)
        # the engine's own services come with its nodes (contacts for contact.*, whatsapp for whatsapp.send)
        self.services |= service_names(ENGINE_DISTRIBUTION)

    def load_entry_points(self) -> None:
        """Installed plugins' node types (entry points of other distributions)."""
        for entry_point in _node_entry_points():
            dist = _distribution(entry_point)
            if dist != ENGINE_DISTRIBUTION:
                self.load_source(f"entry point {entry_point.name} ({dist}: {entry_point.value})", entry_point.load)

    def load_plugins_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                self.load_source(f"plugin {path}", lambda path=path: _import_file(path))


def _node_entry_points() -> list[importlib.metadata.EntryPoint]:
    # one distribution can be visible twice (an editable install plus a build dir); keep the first
    seen: set[tuple[str, str]] = set()
    unique = []
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (_distribution(entry_point), entry_point.name)
        if key not in seen:
            seen.add(key)
            unique.append(entry_point)
    return unique


def _distribution(entry_point: importlib.metadata.EntryPoint) -> str:
    return entry_point.dist.name if entry_point.dist else "?"


def _unregistered_nodes(loaded: Any) -> list[type[Node]]:
    """Node subclasses a module defines with a ``type`` of their own but no ``@register``."""
    if not isinstance(loaded, ModuleType):
        return []
    return [
        value
        for value in vars(loaded).values()
        if isinstance(value, type)
        and issubclass(value, Node)
        and value.__module__ == loaded.__name__
        and "type" in value.__dict__
        and not is_registered(value)
    ]


def _declared_nodes(loaded: Any) -> Iterable[type[Node]]:
    if is_registered(loaded):
        return [loaded]
    if isinstance(loaded, ModuleType):
        return [
            value for value in vars(loaded).values() if is_registered(value) and value.__module__ == loaded.__name__
        ]
    if isinstance(loaded, list | tuple):
        return [value for value in loaded if is_registered(value)]
    return []


def _import_file(path: Path) -> ModuleType:
    name = f"flowchat_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def plugins_folder() -> Path:
    """The configured plugins folder (``FLOWCHAT_PLUGINS``, default ``./plugins``)."""
    return Settings.from_env().plugins


def load_registry(plugins: Path | None = None, *, entry_points: bool = True) -> Registry:
    """Built-ins, then installed entry points, then the plugins folder."""
    registry = Registry()
    registry.load_builtins()
    if entry_points:
        registry.load_entry_points()
        registry.services |= service_names()
    registry.load_plugins_folder(plugins if plugins is not None else plugins_folder())
    return registry
