"""Helpers shared by tests: flow files, the ``flowchat`` command, daemon processes, event-driven waits."""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml

from flowchat.catalog import Catalog
from flowchat.events import unpack
from flowchat.queue import Queue

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEST_PLUGINS = FIXTURES / "plugins"


# --- flow files ----------------------------------------------------------------------------

WEBHOOK: Mapping[str, Any] = {"type": "webhook"}
Nodes = str | Sequence[Mapping[str, Any]]


def flow_yaml(name: str, nodes: Nodes, trigger: str | Mapping[str, Any] = WEBHOOK, **fields: Any) -> str:
    """The text of a flow file: ``flow:``, ``trigger:`` and any other top-level ``fields``, then ``nodes:``.

    ``nodes`` is the node list as YAML text (at any indentation: it is dedented and put under
    ``nodes:``) or as dicts. ``trigger`` and ``fields`` are YAML text or values to dump. Templates
    are written as flow authors write them, ``{{ trigger.name }}``: nothing here is an f-string.
    """
    header = {"flow": name, "trigger": trigger, **fields}
    lines = [f"{key}: {_inline(value)}" for key, value in header.items()]
    return "\n".join(lines) + "\nnodes:\n" + textwrap.indent(_node_list(nodes), "  ")


def write_flow(
    folder: Path, name: str, nodes: Nodes, trigger: str | Mapping[str, Any] = WEBHOOK, **fields: Any
) -> Path:
    """Write ``folder/<name>.yaml`` (see ``flow_yaml``) and return its path."""
    path = folder / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(flow_yaml(name, nodes, trigger, **fields), encoding="utf-8")
    return path


def mark_node(marks: Path, node_id: str, **config: Any) -> dict[str, Any]:
    """A ``test.mark`` node (tests/fixtures/plugins): it appends ``<execution> <node> start|done`` to ``marks``."""
    return {"id": node_id, "type": "test.mark", "with": {"file": str(marks), **config}}


def fail_until(
    exists: Path, node_id: str = "call", retry: Mapping[str, Any] | None = None, **config: Any
) -> dict[str, Any]:
    """A ``test.fail_until`` node: it fails (retryably, unless ``retryable=False``) until ``exists`` does."""
    node: dict[str, Any] = {"id": node_id, "type": "test.fail_until", "with": {"exists": str(exists), **config}}
    return node | ({"retry": dict(retry)} if retry else {})


def _inline(value: Any) -> str:
    if isinstance(value, str):
        return value
    return str(yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf)).strip()


def _node_list(nodes: Nodes) -> str:
    if isinstance(nodes, str):
        return textwrap.dedent(nodes).strip("\n") + "\n"
    return str(yaml.safe_dump([dict(node) for node in nodes], sort_keys=False, width=math.inf))


# --- the flowchat command ------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``FLOWCHAT_*`` setting, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLOWCHAT_")}
    env.update(extra)
    return env


def start_cli(*args: str | Path, env: Mapping[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen[str]:
    """Start ``python -m flowchat.cli ARGS`` as a user runs it (text pipes; ``env`` defaults to ``cli_env()``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flowchat.cli", *map(str, args)],
        cwd=cwd,
        env=cli_env() if env is None else dict(env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_cli(
    process: subprocess.Popen[str], input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Feed ``input`` to a started command, wait for it, and return what it printed."""
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_cli(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m flowchat.cli ARGS`` to the end, as a user runs it, from the repo root.

    ``env`` defaults to this environment without ``FLOWCHAT_*`` settings (see ``daemon_env`` for one
    pointed at the test Redis). Inside a test that runs a worker in process, call it through
    ``asyncio.to_thread`` so the event loop keeps turning while the command runs.
    """
    return finish_cli(start_cli(*args, env=env, cwd=cwd), input, timeout)


def daemon_env(redis_url: str, **extra: str) -> dict[str, str]:
    """An environment for a flowchat process on the test Redis, with the test plugins and short timeouts."""
    env = cli_env()
    env.update(
        FLOWCHAT_REDIS_URL=redis_url,
        FLOWCHAT_PLUGINS=str(TEST_PLUGINS),
        FLOWCHAT_VISIBILITY_TIMEOUT="1.5",
        FLOWCHAT_GRACE="10",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Processes:
    """Start flowchat processes; stop (SIGTERM, then SIGKILL) whatever is left at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str], ready: str = "flowchat:") -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"proc-{len(self.running)}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "flowchat.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log
        )
        self.running.append(process)
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        if ready not in line:
            process.kill()
            raise AssertionError(f"{args} did not start: {line!r}\n{self.log_of(process)}")
        return process

    def log_of(self, process: subprocess.Popen[bytes]) -> str:
        index = self.running.index(process)
        return (self.tmp_path / f"proc-{index}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.02) -> None:
    """Poll an (async or sync) predicate until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        await asyncio.sleep(interval)


# --- queue helpers ---------------------------------------------------------------------


async def enqueue(queue: Queue, catalog: Catalog, flow_name: str, payload: dict[str, Any] | None = None) -> str:
    flow = catalog.get(flow_name)
    assert flow is not None, catalog.problems
    await queue.store_flow(flow)
    execution_id, _ = await queue.enqueue(flow.name, flow.version, payload or {})
    return execution_id


async def settled(queue: Queue, execution_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def done() -> bool:
        stored = await queue.get(execution_id)
        if stored and stored[0]["status"] in ("succeeded", "failed"):
            found.update(stored[0])
            return True
        return False

    await wait_for(done)
    return found


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# --- installed plugins -------------------------------------------------------------------


def install_dist(site: Path, name: str, modules: dict[str, str], entry_points: dict[str, dict[str, str]]) -> Path:
    """Lay out an installed distribution in ``site`` (modules plus a dist-info with entry points).

    Put ``site`` on sys.path (or PYTHONPATH for a process) and importlib.metadata finds it
    exactly as it finds a pip-installed package.
    """
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source, encoding="utf-8")
    dist_info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{key} = {value}" for key, value in entries.items())
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return site


def stream_events(entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]]) -> list[dict[str, Any]]:
    """The events in XRANGE ``entries`` of the events stream, one per row the sink would write
    (batches and carried node runs unpacked), with text fields, ``data`` parsed and ``id`` set."""
    events = []
    for entry_id, fields in entries:
        for row in unpack(fields, fields.get(b"id") or b"stream-" + entry_id):
            event: dict[str, Any] = {k.decode(): v.decode() for k, v in row.items()}
            event["data"] = orjson.loads(event["data"])
            event["id"] = event["id"] or "stream-" + entry_id.decode()
            events.append(event)
    return events
