"""The ``flowchat`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from flowchat import analytics, contacts_cli, whatsapp_cli
from flowchat.codec import execution_json, through_codec
from flowchat.errors import FlowChatError, FlowInvalid
from flowchat.execution import Execution
from flowchat.flow import Flow, trigger_payload
from flowchat.graph import mermaid
from flowchat.listing import limit as listing_limit
from flowchat.loader import load_flow, load_flows
from flowchat.logs import configure_logging, mask_phones
from flowchat.registry import Registry, load_registry
from flowchat.runner import Runner
from flowchat.schema import dumps, flow_schema
from flowchat.secrets import Secrets, flow_secrets, unset_secret_warnings
from flowchat.services import open_services
from flowchat.settings import Settings, SettingsError
from flowchat.startup import StartupError, accept_global_options_anywhere, check_flows_folder, check_operator_redis

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def decorate(func: Command) -> Command:
        COMMANDS[name] = func
        return func

    return decorate


def _registry(args: argparse.Namespace) -> Registry:
    registry = load_registry(Path(args.plugins) if args.plugins else None)
    for error in registry.errors:
        print(f"warning: [{error.code}] {error.message}", file=sys.stderr)
    return registry


def _warn_unset_secrets(flows: Iterable[Flow]) -> None:
    for warning in unset_secret_warnings(flow_secrets(flows), Secrets.from_settings(Settings.from_env())):
        print(f"warning: {warning}", file=sys.stderr)


def _print_problems(problems: Sequence[FlowChatError]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


@command("validate")
def validate(args: argparse.Namespace) -> int:
    registry = _registry(args)
    flows, problems = load_flows(args.paths, registry)
    missing = [path for path in args.paths if not Path(path).exists()]
    for path in missing:
        print(f"{path}:1:1: [flow-unreadable] no such file or folder", file=sys.stderr)
    _print_problems(problems)
    _warn_unset_secrets(flows.values())
    if problems or missing:
        print(f"{len(problems) + len(missing)} problem(s) found", file=sys.stderr)
        return 1
    for name, flow in sorted(flows.items()):
        print(f"ok  {flow.file}  ({name}, {len(flow.nodes)} nodes, trigger {flow.trigger.type})")
    return 0


@command("run")
def run(args: argparse.Namespace) -> int:
    registry = _registry(args)
    try:
        flow = load_flow(args.flow, registry)
        trigger = trigger_payload(flow, _read_input(args.input))
    except FlowInvalid as invalid:
        _print_problems(invalid.errors)
        return 1
    except ValueError as exc:
        print(f"error: --input: {exc}", file=sys.stderr)
        return 2

    _warn_unset_secrets([flow])
    execution = asyncio.run(run_in_process(flow, trigger, fast_forward=args.fast_forward))
    print(json.dumps(execution_json(execution), indent=2, default=str) if args.json else format_trace(execution))
    return 0 if execution.status == "succeeded" else 1


async def run_in_process(
    flow: Flow, trigger: dict[str, Any], *, fast_forward: bool = False, settings: Settings | None = None
) -> Execution:
    """Run ``flow`` as a worker would: same output boundary, every node state through the storage codec.

    With ``fast_forward`` durable waits (``delay``, retry backoff) are skipped: the clock nodes see
    jumps ahead instead of the process sleeping.
    """
    settings = settings or Settings.from_env()
    clock = _Clock()
    # a flow that uses services gets all of them, as in the daemon: services use each other
    # (whatsapp reads contacts for the 24-hour window); a flow that uses none starts none
    async with open_services(settings, only=None if flow.services else ()) as services:
        if fast_forward:
            services.clock = clock.now
        runner = Runner(
            services,
            checkpoint=through_codec,
            max_output=settings.max_output,
            sleep=clock.skip if fast_forward else asyncio.sleep,
        )
        return await runner.run(flow, Execution.new(flow, trigger))


class _Clock:
    """Wall-clock time that can be skipped ahead (``flowchat run --fast-forward``)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    async def skip(self, seconds: float) -> None:
        self.offset += seconds
        await asyncio.sleep(0)


def _read_input(source: str | None) -> dict[str, Any]:
    if source is None:
        return {}
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {source}: {exc}") from exc
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("the trigger payload must be a JSON object")
    return data


def format_trace(execution: Execution) -> str:
    """A human table of an execution's nodes."""
    lines = [f"execution {execution.id}  flow {execution.flow}  status {execution.status}"]
    lines.append(f"  {'node':<20} {'status':<8} {'attempts':>8} {'ms':>9}  result")
    for run in execution.nodes.values():
        if run.error:
            result = f"[{run.error['code']}] {run.error['message']}"
        else:
            result = json.dumps(run.output, default=str) if run.output is not None else ""
        # phone numbers masked in tables, as in logs (--json prints the stored values)
        lines.append(
            f"  {run.id:<20} {run.status:<8} {run.attempts:>8} {run.duration_ms:>9.1f}  {_clip(mask_phones(result))}"
        )
    if execution.error:
        lines.append(
            f"error: node {execution.error.get('node')}: [{execution.error['code']}] "
            + mask_phones(execution.error["message"])
        )
    return "\n".join(lines)


def age(timestamp: float | None) -> str:
    """How long ago ``timestamp`` (epoch seconds) was, for tables: ``3m ago``."""
    if not timestamp:
        return "-"
    seconds = max(0.0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _clip(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@command("nodes")
def list_nodes(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entries: list[dict[str, Any]] = [
        {
            "type": name,
            "summary": registry.types[name].summary(),
            "source": registry.sources[name],
            "config_schema": registry.types[name].Config.model_json_schema(by_alias=True),
        }
        for name in registry.names()
    ]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        print(f"{entry['type']:<18} {entry['summary']}")
        for key, prop in entry["config_schema"].get("properties", {}).items():
            required = "*" if key in entry["config_schema"].get("required", []) else " "
            print(f"    {required}{key:<14} {prop.get('description', '')}")
    return 0


@command("schema")
def schema(args: argparse.Namespace) -> int:
    if args.builtins_only:
        registry = Registry()
        registry.load_builtins()
    else:
        registry = _registry(args)
    sys.stdout.write(dumps(flow_schema(registry)))
    return 0


@command("graph")
def graph(args: argparse.Namespace) -> int:
    try:
        flow = load_flow(args.flow, _registry(args))
    except FlowInvalid as invalid:
        _print_problems(invalid.errors)
        return 1
    print(mermaid(flow), end="")
    return 0


# --- the daemon ------------------------------------------------------------------------


@command("serve")
def serve(args: argparse.Namespace) -> int:
    from flowchat.daemon import run
    from flowchat.daemon import serve as serve_daemon

    check_flows_folder(Path(args.flows))
    plugins = Path(args.plugins) if args.plugins else None
    return run(
        serve_daemon(
            Path(args.flows),
            args.host,
            args.port,
            args.concurrency,
            workers=not args.no_workers,
            plugins=plugins,
            strict=args.strict,
        )
    )


@command("worker")
def worker(args: argparse.Namespace) -> int:
    from flowchat.daemon import run, work

    check_flows_folder(Path(args.flows))
    plugins = Path(args.plugins) if args.plugins else None
    return run(work(Path(args.flows), args.concurrency, plugins, host=args.host, port=args.port))


# --- operators ---------------------------------------------------------------------------


def _with_queue(action: Callable[[Any], Any]) -> Any:
    """Run ``action(queue)`` against the configured Redis, or the embedded one."""
    from redis.exceptions import RedisError

    from flowchat.daemon import operator_queue

    settings = Settings.from_env()
    check_operator_redis(settings)  # never a new data dir or an empty embedded Redis

    async def go() -> Any:
        async with operator_queue(settings) as queue:
            return await action(queue)

    try:
        return asyncio.run(go())
    except (RedisError, OSError, FlowChatError) as exc:
        print(f"error: cannot reach the queue's Redis: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


@command("executions")
def executions(args: argparse.Namespace) -> int:
    from flowchat import operations

    if args.action == "list":
        since = _since(args.since)
        status = "failed" if args.status == "dead" else args.status
        rows = _with_queue(lambda q: operations.list_executions(q, args.flow, status, args.limit, since=since))
        if args.json:
            from flowchat.listing import execution_record

            print(json.dumps([execution_record(row) for row in rows], indent=2, default=str))
            return 0
        print(f"{'id':<26} {'flow':<20} {'status':<10} created")
        for row in rows:
            print(f"{row['id']:<26} {row['flow']:<20} {row['status']:<10} {age(row['created_at'])}")
        return 0
    if args.action == "cancel":
        return _cancel(args.id)
    found = _with_queue(lambda q: operations.load_stored(q, args.id))
    if found is None:
        print(f"error: no execution {args.id}", file=sys.stderr)
        return 1
    execution, compact = found
    if args.json:
        print(json.dumps(execution_json(execution), indent=2, default=str))
        return 0
    print(format_trace(execution))
    if compact:
        print(compact_note(execution.id))
    return 0


def compact_note(execution_id: str) -> str:
    """What ``executions show`` adds under a succeeded execution, whose outputs Redis no longer holds."""
    return (
        "note: outputs of a succeeded execution are not retained (nor its trigger, past 64 bytes): Redis keeps\n"
        "this summary until FLOWCHAT_RETENTION_SUCCEEDED. Its node runs are in analytics:\n"
        f"  flowchat analytics sql \"select * from node_runs where execution_id = '{execution_id}'\""
    )


def _since(age: str | None) -> float | None:
    if not age:
        return None
    from flowchat.durations import parse_duration

    try:
        return time.time() - parse_duration(age)
    except ValueError as exc:
        raise StartupError("bad-since", f"--since {age!r}: {exc}", status=2) from None


def _cancel(execution_id: str) -> int:
    """``executions cancel ID``: one line saying what happened; exit 0 only when it is cancelled now."""
    import logging

    status = _with_queue(lambda q: q.cancel(execution_id))
    if status == "cancelled":
        logging.getLogger("flowchat.audit").warning("execution %s cancelled by an operator", execution_id)
        print(f"cancelled {execution_id}")
        return 0
    if status == "cancelling":
        logging.getLogger("flowchat.audit").warning("execution %s cancelled by an operator while running", execution_id)
        print(f"cancelling {execution_id}: it is running and stops at its next node boundary")
        return 0
    if status == "missing":
        print(f"error: no execution {execution_id}", file=sys.stderr)
    else:
        print(f"error: {execution_id} is {status}: nothing to cancel", file=sys.stderr)
    return 1


@command("dlq")
def dlq(args: argparse.Namespace) -> int:
    from flowchat import operations

    if args.action == "list":
        entries = _with_queue(lambda q: q.dead_letters())
        if args.json:
            from flowchat.listing import dead_letter_record

            print(json.dumps([dead_letter_record(entry) for entry in entries], indent=2))
            return 0
        print(f"{'execution':<26} {'flow':<20} {'node':<14} error")
        for entry in entries:
            print(
                f"{entry['e']:<26} {entry['flow']:<20} {entry['node']:<14} [{entry['code']}] {_clip(mask_phones(entry['message']), 80)}"
            )
        return 0
    if args.action == "drop":
        removed = _with_queue(lambda q: q.remove_dead_letters(args.id))
        print(f"dropped {removed} dead letter(s) of {args.id}")
        return 0 if removed else 1
    if not args.all and not args.id:
        print("error: give an execution id or --all", file=sys.stderr)
        return 2

    latest = None
    if args.latest:
        latest, problems = load_flows([args.flows], _registry(args))
        _print_problems(problems)

    async def replay(queue: Any) -> list[str]:
        if args.all:
            return await operations.replay_all(queue, latest=latest)
        return [args.id] if await operations.replay(queue, args.id, latest=latest) else []

    replayed = _with_queue(replay)
    for execution_id in replayed:
        print(f"replayed {execution_id}")
    if not replayed:
        print("error: nothing replayed: no failed execution with that id", file=sys.stderr)
    return 0 if replayed else 1


@command("queue")
def queue_stats(args: argparse.Namespace) -> int:
    from flowchat import capacity, listing

    async def read(queue: Any) -> tuple[dict[str, Any], capacity.Capacity | None]:
        stats = await queue.stats()
        try:
            return stats, await capacity.measure(queue)
        except Exception:  # memory facts are extra: INFO/MEMORY may be disabled on managed Redis
            return stats, None

    stats, room = _with_queue(read)
    if args.json:
        print(json.dumps(listing.queue_stats_record(stats, room.as_dict() if room else None), indent=2))
        return 0
    for key in ("ready", "delayed", "in_flight", "dead", "events"):
        print(f"{key:<10} {stats[key]}")
    print(f"{'events_age':<10} {stats['events_age_seconds']:.1f}s")
    for line in capacity.lines(room) if room is not None else ():
        print(line)
    per_flow: dict[str, dict[str, int]] = {}
    for name, value in stats["counters"].items():
        event, _, flow = name.partition(":")
        per_flow.setdefault(flow, {})[event] = value
    if per_flow:
        print(f"\n{'flow':<20} {'succeeded':>10} {'failed':>8} {'dead':>6} {'retried':>8}")
        for flow, counts in sorted(per_flow.items()):
            print(
                f"{flow:<20} {counts.get('succeeded', 0):>10} {counts.get('failed', 0):>8} "
                f"{counts.get('dead', 0):>6} {counts.get('retried', 0):>8}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowchat",
        description="FlowChat: a reactive, low-code flow engine for WhatsApp CRM automation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  flowchat validate flows                          check every flow, with file:line:col errors
  flowchat run flows/lead_intake.yaml --input p.json
  flowchat serve                                   the daemon on embedded Redis (./.flowchat)
  flowchat executions show ID                      what happened, node by node

environment:
  FLOWCHAT_REDIS_URL           Redis to use (unset: a private redis-server with AOF)
  FLOWCHAT_DATA_DIR            where the embedded Redis keeps its data (default ./.flowchat)
  FLOWCHAT_PLUGINS             folder of plugin nodes (default ./plugins)
  FLOWCHAT_VISIBILITY_TIMEOUT  seconds before a silent worker's execution is taken over (30)
  FLOWCHAT_GRACE               seconds in-flight work may take to finish on SIGTERM (30)
  FLOWCHAT_PUBLIC_URL          public base URL, for Twilio signatures behind a proxy
  FLOWCHAT_QUEUE               queue (partition) name, its keys' hash tag (default fc)
  FLOWCHAT_REDIS_CLUSTER       1: Redis Cluster, 0: never (default: ask the server)
  FLOWCHAT_REDIS_SENTINELS     host:port,... of Sentinels (with FLOWCHAT_REDIS_SENTINEL_MASTER)
  FLOWCHAT_RETENTION_SUCCEEDED how long finished executions stay in Redis (24h)
  FLOWCHAT_RETENTION_FAILED    how long failed/dead executions and dead letters stay (7d)
  FLOWCHAT_DEDUPE_TTL          how long an Idempotency-Key maps to its execution (24h)
  FLOWCHAT_LOG_FORMAT          text or json (text)
  (every setting: the README's Settings table)""",
    )
    parser.add_argument("--plugins", metavar="DIR", help="plugins folder (default: $FLOWCHAT_PLUGINS or ./plugins)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default: INFO for serve/worker)")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text or JSON (default: $FLOWCHAT_LOG_FORMAT or text)",
    )
    parser.add_argument("--version", action="version", version=f"flowchat {_version()}")
    sub = _Described(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    p = sub.add_parser("validate", help="check flow files and report every problem with file:line:col")
    p.add_argument("paths", nargs="+", metavar="PATH", help="flow files or folders of them")

    p = sub.add_parser("run", help="run one flow in process over one trigger payload and print its trace")
    p.add_argument("flow", metavar="FLOW.yaml")
    p.add_argument("--input", "-i", metavar="FILE", help="trigger payload as JSON ('-' reads stdin; default {})")
    p.add_argument("--json", action="store_true", help="print the execution as JSON")
    p.add_argument(
        "--fast-forward", action="store_true", help="skip durable waits (delay, retry backoff) instead of sleeping"
    )

    p = sub.add_parser("nodes", help="list node types with their summary and config")
    p.add_argument("--json", action="store_true", help="print types, summaries and config schemas as JSON")

    p = sub.add_parser("schema", help="print the JSON Schema of flow files (for editor autocompletion)")
    p.add_argument(
        "--builtins-only",
        action="store_true",
        help="only the built-in node types (the schema shipped as flowchat/flow.schema.json)",
    )

    p = sub.add_parser("graph", help="print a flow as a Mermaid flowchart")
    p.add_argument("flow", metavar="FLOW.yaml")

    p = sub.add_parser("serve", help="run the daemon: webhook ingress, workers, scheduler, delayed-work mover")
    _daemon_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--no-workers", action="store_true", help="ingress and scheduler only; run `flowchat worker` elsewhere"
    )
    p.add_argument(
        "--strict", action="store_true", help="refuse to start if any flow file is broken (default: serve the others)"
    )

    p = sub.add_parser("worker", help="run workers only, against the same Redis as the daemon")
    _daemon_options(p)
    p.add_argument(
        "--port", type=int, metavar="N", help="serve /healthz, /readyz and /metrics on this port (default: off)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address for --port (default 127.0.0.1)")

    p = sub.add_parser("executions", help="inspect executions stored in the queue")
    actions = _Described(p.add_subparsers(dest="action", required=True, metavar="ACTION"))
    a = actions.add_parser("list", help="recent executions, newest first")
    a.add_argument("--flow", help="only this flow")
    a.add_argument(
        "--status",
        choices=["queued", "running", "waiting", "succeeded", "failed", "dead", "cancelled"],
        help="only this status (dead: failed for good, with a dead letter; the same as failed)",
    )
    a.add_argument("--since", metavar="AGE", help="only executions created in the last AGE (30m, 1h, 7d)")
    a.add_argument("--limit", type=listing_limit, default=20, help="at most this many (default 20)")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("cancel", help="cancel a queued or waiting execution (e.g. a contact who opted out)")
    a.add_argument("id")
    a = actions.add_parser(
        "show", help="one execution: per node status, attempts, duration, output (until it succeeds) or error"
    )
    a.add_argument("id")
    a.add_argument("--json", action="store_true")

    p = sub.add_parser("dlq", help="dead letters: failed and poison executions")
    actions = _Described(p.add_subparsers(dest="action", required=True, metavar="ACTION"))
    a = actions.add_parser("list", help="every dead letter with its error")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("replay", help="queue a dead execution again; it resumes at its failed node")
    a.add_argument("id", nargs="?", help="execution id")
    a.add_argument("--all", action="store_true", help="replay every dead letter")
    a.add_argument(
        "--latest", action="store_true", help="run on the flow's current version (after fixing the flow file)"
    )
    a.add_argument("--flows", default="flows", metavar="DIR", help="where --latest finds flows (default ./flows)")
    a = actions.add_parser("drop", help="remove an execution's dead letters")
    a.add_argument("id")

    p = sub.add_parser("queue", help="queue state")
    actions = _Described(p.add_subparsers(dest="action", required=True, metavar="ACTION"))
    a = actions.add_parser("stats", help="ready, delayed, in flight and dead counts, and per-flow totals")
    a.add_argument("--json", action="store_true")

    # Command families that live beside their concept: each module's add_commands(sub) adds its
    # parsers and registers its handlers with @command. One line per family, in its section.
    # -- crm (contacts)
    contacts_cli.add_commands(sub)

    # -- whatsapp (simulate, messages)
    whatsapp_cli.add_commands(sub)

    # -- analytics (analytics, sink)
    analytics.add_commands(sub)

    # -- operations
    accept_global_options_anywhere(parser)

    return parser


class _Described:
    """Subparsers whose one-line help is also the description `SUB --help` prints."""

    def __init__(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        self.subparsers = subparsers

    def add_parser(self, name: str, *, help: str) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")


def _daemon_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flows", default="flows", metavar="DIR", help="folder of flow files, hot-reloaded (default ./flows)"
    )
    parser.add_argument("--concurrency", type=int, default=32, metavar="N", help="executions run at once (default 32)")


def _version() -> str:
    try:
        return metadata.version("flowchat-engine")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default_level = "INFO" if args.command in ("serve", "worker") else "WARNING"
    handler = getattr(args, "handler", None) or COMMANDS[args.command]
    try:
        settings = Settings.from_env()
        log_format = args.log_format or settings.log_format
        configure_logging((args.log_level or default_level).upper(), log_format, region=settings.default_region)
        return handler(args)
    except KeyboardInterrupt:
        return 130  # Ctrl-C: quietly, with the shell's usual status
    except BrokenPipeError:
        # the reader of our output went away (`| head`): nothing more to say, and nothing at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except SettingsError as exc:  # a bad FLOWCHAT_* value or secrets file: named, no traceback
        print(f"error: [{exc.code}] {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:  # port taken, no flows folder, no Redis to inspect: one line
        print(exc, file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
