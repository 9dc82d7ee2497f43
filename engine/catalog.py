"""The flows a daemon serves, kept in step with the flows folder (hot reload).

A file added or edited is loaded; if it is invalid its errors are logged and
the previous version keeps serving. A removed file stops serving. Executions
finish on the version they started with: older versions are rebuilt from the
YAML the queue stored when they were enqueued.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from flowchat.errors import FlowChatError, FlowInvalid
from flowchat.flow import Flow
from flowchat.loader import flow_files, load_flow, load_flow_text
from flowchat.registry import Registry
from flowchat.secrets import Secrets, flow_secrets, unset_secret_warnings

log = logging.getLogger("flowchat.catalog")
SourceLookup = Callable[[str, str], Awaitable[tuple[str, str] | None]]


@dataclass
class Catalog:
    """The flows loaded from one folder, by file, name and route; and the versions executions run on."""

    folder: Path
    registry: Registry
    by_file: dict[Path, Flow] = field(default_factory=dict)
    problems: dict[Path, list[FlowChatError]] = field(default_factory=dict)
    _signatures: dict[Path, tuple[int, int]] = field(default_factory=dict)
    _versions: OrderedDict[tuple[str, str], Flow] = field(default_factory=OrderedDict)
    max_versions: int = 256
    """Older flow versions kept loaded (least recently used dropped first); current ones are always at hand."""
    secrets: Secrets | None = None
    """The secrets the daemon has: a flow (re)loaded later that reads an unset one is warned about."""
    _by_name: dict[str, Flow] = field(default_factory=dict)
    _by_route: dict[str, Flow] = field(default_factory=dict)

    @property
    def flows(self) -> dict[str, Flow]:
        return self._by_name

    def get(self, name: str) -> Flow | None:
        return self._by_name.get(name)

    def webhook(self, path: str) -> Flow | None:
        return self._by_route.get(path)

    def by_trigger(self, trigger_type: str) -> list[Flow]:
        return [flow for flow in self.by_file.values() if flow.trigger.type == trigger_type]

    def reload(self) -> bool:
        """Pick up added, edited and removed files. Returns True if anything changed.

        It may run in a thread: the new set of flows is built aside and swapped in whole,
        so readers on the event loop never see a dict change under them.
        """
        current = {path: signature for path in flow_files([self.folder]) if (signature := _signature(path))}
        by_file, problems = dict(self.by_file), dict(self.problems)
        changed = False
        for path in set(self._signatures) - set(current):
            self._signatures.pop(path)
            problems.pop(path, None)
            if by_file.pop(path, None) is not None:
                log.info("flow file removed: %s", path)
                changed = True
        for path, signature in current.items():
            if self._signatures.get(path) != signature:
                self._signatures[path] = signature
                changed |= self._load(path, by_file, problems)
        self.by_file, self.problems = by_file, problems
        self._by_name = {flow.name: flow for flow in by_file.values()}
        self._by_route = {route: flow for flow in by_file.values() if (route := flow.webhook_path) is not None}
        return changed

    def _load(self, path: Path, by_file: dict[Path, Flow], problems: dict[Path, list[FlowChatError]]) -> bool:
        try:
            flow = load_flow(path, self.registry)
        except FlowInvalid as invalid:
            problems[path] = invalid.errors
            keeping = " (the previous version keeps serving)" if path in by_file else ""
            log.error("flow %s rejected%s:\n%s", path, keeping, invalid)
            return False
        clash = flow.clash(by_file.values())
        if clash is not None:
            problems[path] = [clash]
            log.error("flow %s rejected: %s", path, clash.message)
            return False
        route = flow.webhook_path
        if route and not (flow.trigger.secret_env or flow.trigger.token_env):
            log.warning(
                "flow %s: /hooks/%s has no secret_env or token_env; anyone who reaches it can trigger it",
                flow.name,
                route,
            )
        problems.pop(path, None)
        by_file[path] = flow
        self._remember(flow)
        log.info("flow %s loaded (version %s)", flow.name, flow.version)
        if self.secrets is not None:
            for warning in unset_secret_warnings(flow_secrets([flow]), self.secrets):
                log.warning("%s", warning)
        return True

    def _remember(self, flow: Flow, key: tuple[str, str] | None = None) -> None:
        key = key or (flow.name, flow.version)
        self._versions[key] = flow
        self._versions.move_to_end(key)
        while len(self._versions) > self.max_versions:
            self._versions.popitem(last=False)

    async def flow_at(self, name: str, version: str, lookup: SourceLookup) -> Flow | None:
        """The exact flow version an execution started with: loaded, or rebuilt from the YAML the queue stored."""
        flow = self._versions.get((name, version))
        if flow is not None:
            self._versions.move_to_end((name, version))
            return flow
        current = self.get(name)
        if current is not None and current.version == version:
            return current
        stored = await lookup(name, version)
        if stored is None:
            return None
        file, source = stored
        try:
            flow = load_flow_text(source, file, self.registry)
        except FlowInvalid as invalid:
            log.error("stored version %s of flow %s no longer loads:\n%s", version, name, invalid)
            return None
        self._remember(flow, (name, version))
        return flow

    async def watch(self, interval: float = 1.0, on_change: Callable[[], None] | None = None) -> None:
        """Poll the folder until cancelled. No error stops it: the flows loaded so far keep serving."""
        while True:
            await asyncio.sleep(interval)
            try:
                changed = await asyncio.to_thread(self.reload)
            except Exception as exc:  # EMFILE, a vanished folder, a bug: log it and look again next time
                log.error("flow watcher: cannot reload %s (flows loaded so far keep serving): %r", self.folder, exc)
                continue
            if changed and on_change:
                on_change()


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:  # removed (or unreadable) between listing and looking
        return None
    return stat.st_mtime_ns, stat.st_size
