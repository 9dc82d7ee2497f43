"""Start-up checks: what an operator can fix is said in one line, never a traceback.

Fatal problems (the process cannot do its job: the port is taken, the flows folder is
missing, an operator command has no Redis to read) raise :class:`StartupError`, which
the command line prints as ``flowchat: error: [code] message`` and exits with its
status. Risky settings (an eviction policy that can drop queued work, a webhook whose
token variable is unset) are logged as one warning each and the process carries on.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from flowchat.catalog import Catalog
from flowchat.settings import Settings

log = logging.getLogger("flowchat.startup")

DATA_MARKERS = ("appendonlydir", "appendonly.aof", "dump.rdb", "redis.sock")
"""Files an embedded Redis leaves in its data directory: their presence means FlowChat data."""


class StartupError(Exception):
    """A problem that stops the process, with a stable code and the exit status to use."""

    def __init__(self, code: str, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status

    def __str__(self) -> str:
        return f"flowchat: error: [{self.code}] {self.message}"


def check_flows_folder(folder: Path) -> None:
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise StartupError(
            "flows-folder-missing", f"flows folder {folder.resolve()} {what}; create it or pass --flows DIR"
        )


def port_taken(host: str, port: int, exc: OSError) -> StartupError:
    return StartupError(
        "port-in-use",
        f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what uses it or pass --port N",
    )


def has_data(data_dir: Path) -> bool:
    return any((data_dir / marker).exists() for marker in DATA_MARKERS)


def check_operator_redis(settings: Settings) -> None:
    """Operator commands read an existing queue: never create a data dir nor start an empty Redis."""
    if settings.redis_url or settings.redis_sentinels or has_data(settings.data_dir):
        return
    raise StartupError(
        "no-redis",
        f"no FLOWCHAT_REDIS_URL (or FLOWCHAT_REDIS_SENTINELS) and no FlowChat data in {settings.data_dir.resolve()}; "
        "set FLOWCHAT_REDIS_URL to the daemon's Redis, or FLOWCHAT_DATA_DIR to its data directory",
    )


async def eviction_warning(redis: Any) -> str | None:
    """A line when Redis may evict keys (queued executions) to make room; None when it is noeviction or unknown."""
    try:
        info = await redis.info("memory")
    except (RedisError, OSError):
        return None  # unreachable: the link state says so
    if isinstance(info, dict) and "maxmemory_policy" not in info and info:
        info = next(iter(info.values()))  # a cluster client answers per node
    policy = str(info.get("maxmemory_policy", "noeviction")) if isinstance(info, dict) else "noeviction"
    if policy == "noeviction":
        return None
    return (
        f"redis maxmemory-policy is {policy}: Redis may evict queued executions and their state when full; "
        "set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf)"
    )


def unset_webhook_secrets(catalog: Catalog, settings: Settings) -> list[str]:
    """One line per webhook flow whose ``token_env``/``secret_env`` variable is unset (it answers 503 until set)."""
    lines = []
    for flow in sorted(catalog.flows.values(), key=lambda flow: flow.name):
        trigger = flow.trigger
        for option in ("token_env", "secret_env"):
            name = getattr(trigger, option, None)
            if name and settings.env(name) is None:
                lines.append(
                    f"flow {flow.name}: {option} {name} is not set; its webhook answers 503 until it is "
                    f"(set {name} and restart)"
                )
    return lines


GLOBAL_OPTIONS = ("--plugins", "--log-level", "--log-format")


def accept_global_options_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``--plugins``, ``--log-level`` and ``--log-format`` follow the command too (``serve --plugins DIR``).

    Each subcommand gets copies whose default is SUPPRESS, so a value given before the
    command is kept unless the same option is repeated after it.
    """
    options = [action for action in parser._actions if set(action.option_strings) & set(GLOBAL_OPTIONS)]
    for sub in _subparsers(parser):
        taken = {flag for action in sub._actions for flag in action.option_strings}
        for action in options:
            if not set(action.option_strings) & taken:
                sub.add_argument(
                    *action.option_strings,
                    dest=action.dest,
                    metavar=action.metavar,
                    choices=action.choices,
                    help=action.help,
                    default=argparse.SUPPRESS,
                )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += [sub, *_subparsers(sub)]
    return found
