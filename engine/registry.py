"""Where node types come from: built-ins, pip packages and the plugins folder.

All three go through :meth:`Registry.load_source`: import a module, collect the
classes marked with :func:`flowchat.register`. A module that fails to import, or
a type declared twice, is recorded as a :class:`PluginError` with its source
and cause; flows that need such a type are refused at load time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
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

    def get(self, node_type: str) -> type[Node] | None:
        return None if node_type in self.conflicts else self.types.get(node_type)

    def names(self) -> list[str]:
        return sorted(name for name in self.types if name not in self.conflicts)

    def add(self, cls: type[Node], source: str) -> None:
        name = cls.type
        if name in self.types and self.types[name] is not cls:
            error = PluginError(
                f"node type {name!r} is declared by both {self.sources[name]} and {source}",
                code="plugin-duplicate-type",
            )
            self.conflicts[name] = error
            self.errors.append(error)
            return
        self.types[name] = cls
        self.sources[name] = source

    def load_source(self, source: str, load: Any) -> None:
        """Import through ``load()`` and register what it declares; record failures."""
        try:
            loaded = load()
        except Exception as exc:  # a plugin may raise anything while importing
            error = PluginError(f"{source} failed to import: {type(exc).__name__}: {exc}", code="plugin-import-failed")
            error.__cause__ = exc
            self.errors.append(error)
            return
        for cls in _declared_nodes(loaded):
            self.add(cls, source)

    def load_builtins(self) -> None:
        import flowchat.nodes as nodes

        for module in pkgutil.iter_modules(nodes.__path__, prefix="flowchat.nodes."):
            self.load_source(f"built-in {module.name}", lambda name=module.name: importlib.import_module(name))

    def load_entry_points(self) -> None:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist.name if entry_point.dist else "?"
            self.load_source(f"entry point {entry_point.name} ({dist}: {entry_point.value})", entry_point.load)

    def load_plugins_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                self.load_source(f"plugin {path}", lambda path=path: _import_file(path))


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
