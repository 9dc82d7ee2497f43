"""Settings: the process's configuration, read from the environment once.

Every ``FLOWCHAT_*`` variable (and the Twilio credentials) is read here and
nowhere else; the rest of the engine receives a :class:`Settings`. The README's
"Settings" table documents each field with its variable and default. Fields are
grouped by the part of FlowChat that owns them; add new ones to their group.

One reading happens without a :class:`Settings`: :func:`secret_values`, the values
of variables whose names say they are secret, which the log filters mask from the
moment ``flowchat.logs`` is imported (an embedding process may never build settings).

A :class:`Settings` is read-only: plugins' service factories receive it too
(``flowchat.services`` entry points), so they see the same configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _text(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, default).strip() or default


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


def _size(env: Mapping[str, str], name: str, default: int) -> int:
    return int(_number(env, name, default))


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not on/off")


def _duration(env: Mapping[str, str], name: str, default: float) -> float:
    """``24h``, ``7d``, ``90m`` or plain seconds."""
    from flowchat.durations import parse_duration

    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse_duration(float(raw) if raw.replace(".", "", 1).isdigit() else raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a duration (like 24h, 7d or seconds)") from None


def _optional_flag(env: Mapping[str, str], name: str) -> bool | None:
    return _flag(env, name, False) if env.get(name, "").strip() else None


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = _text(env, name, choices[0]).lower()
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _addresses(env: Mapping[str, str], name: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (Sentinel addresses)."""
    found = []
    for item in filter(None, (part.strip() for part in env.get(name, "").split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise SettingsError(f"{name}: {item!r} is not host:port")
        found.append((host.strip("[]"), int(port)))
    return tuple(found)


SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY")
"""A variable whose name contains one of these (any case) holds a secret that no log line may show."""


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the variables :data:`SECRET_MARKERS` names, 8 characters or more (shorter ones match too much)."""
    env = os.environ if environ is None else environ
    return [
        value
        for name, value in env.items()
        if len(value) >= 8 and any(marker in name.upper() for marker in SECRET_MARKERS)
    ]


class SettingsError(ValueError):
    """A setting in the environment that cannot be read (named in the message)."""

    code = "settings-invalid"


@dataclass(frozen=True)
class Settings:
    """Read-only configuration of one FlowChat process."""

    # --- engine: storage, queue, workers -------------------------------------------------
    data_dir: Path = Path(".flowchat")
    redis_url: str = ""
    queue: str = "fc"
    plugins: Path = Path("plugins")
    visibility_timeout: float = 30.0
    grace: float = 30.0
    max_output: int = 1024 * 1024
    stall_threshold: float = 1.0

    # --- ingress -----------------------------------------------------------------------
    public_url: str = ""
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024

    # --- sdk: secrets ---------------------------------------------------------------------
    secrets_file: str = ""

    # --- crm: contacts, limiter, events ----------------------------------------------------
    default_region: str = ""
    analytics: bool = True

    # --- whatsapp -----------------------------------------------------------------------
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_api_url: str = ""
    twilio_whatsapp_number: str = ""
    send_rate: str = "80/1s"
    recipient_rate: str = "1/6s"
    twilio_timeout: float = 15.0

    # --- analytics: the events sink ---------------------------------------------------------
    analytics_batch: int = 5000
    analytics_flush: float = 1.0
    analytics_retention_days: int = 0
    analytics_compact_every: float = 60.0
    analytics_lease: float = 10.0

    # --- operations ---------------------------------------------------------------------
    log_format: str = "text"
    redis_cluster: bool | None = None
    """FLOWCHAT_REDIS_CLUSTER: force (1) or refuse (0) Cluster mode; unset asks the server."""
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = ""
    redis_password: str = ""
    redis_sentinel_password: str = ""
    redis_tls: bool = False
    redis_tls_ca_file: str = ""
    retention_succeeded: float = 24 * 3600.0
    retention_failed: float = 7 * 24 * 3600.0
    dedupe_ttl: float = 24 * 3600.0
    compact_succeeded: bool = True
    """FLOWCHAT_COMPACT_SUCCEEDED: keep only a compact summary of a succeeded execution (0: its full state)."""

    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    """The environment these settings were read from, for names a flow chooses (``token_env``)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        return cls(
            data_dir=Path(_text(env, "FLOWCHAT_DATA_DIR", ".flowchat")),
            redis_url=_text(env, "FLOWCHAT_REDIS_URL"),
            queue=_text(env, "FLOWCHAT_QUEUE", "fc"),
            plugins=Path(_text(env, "FLOWCHAT_PLUGINS", "plugins")),
            visibility_timeout=_number(env, "FLOWCHAT_VISIBILITY_TIMEOUT", 30.0),
            grace=_number(env, "FLOWCHAT_GRACE", 30.0),
            max_output=_size(env, "FLOWCHAT_MAX_OUTPUT", 1024 * 1024),
            stall_threshold=_number(env, "FLOWCHAT_STALL_THRESHOLD", 1.0),
            public_url=_text(env, "FLOWCHAT_PUBLIC_URL").rstrip("/"),
            header_timeout=_number(env, "FLOWCHAT_HEADER_TIMEOUT", 10.0),
            body_timeout=_number(env, "FLOWCHAT_BODY_TIMEOUT", 30.0),
            max_connections=_size(env, "FLOWCHAT_MAX_CONNECTIONS", 1024),
            secrets_file=_text(env, "FLOWCHAT_SECRETS_FILE"),
            default_region=_text(env, "FLOWCHAT_DEFAULT_REGION").upper(),
            analytics=_flag(env, "FLOWCHAT_ANALYTICS", True),
            twilio_account_sid=_text(env, "TWILIO_ACCOUNT_SID"),
            twilio_auth_token=_text(env, "TWILIO_AUTH_TOKEN"),
            twilio_api_url=_text(env, "FLOWCHAT_TWILIO_API_URL").rstrip("/"),
            twilio_whatsapp_number=_text(env, "TWILIO_WHATSAPP_NUMBER"),
            send_rate=_text(env, "FLOWCHAT_SEND_RATE", "80/1s"),
            recipient_rate=_text(env, "FLOWCHAT_RECIPIENT_RATE", "1/6s"),
            twilio_timeout=_number(env, "FLOWCHAT_TWILIO_TIMEOUT", 15.0),
            analytics_batch=max(1, _size(env, "FLOWCHAT_ANALYTICS_BATCH", 5000)),
            analytics_flush=_number(env, "FLOWCHAT_ANALYTICS_FLUSH", 1.0),
            analytics_retention_days=_size(env, "FLOWCHAT_ANALYTICS_RETENTION_DAYS", 0),
            analytics_compact_every=_number(env, "FLOWCHAT_ANALYTICS_COMPACT_EVERY", 60.0),
            analytics_lease=_number(env, "FLOWCHAT_ANALYTICS_LEASE", 10.0),
            log_format=_choice(env, "FLOWCHAT_LOG_FORMAT", ("text", "json")),
            redis_cluster=_optional_flag(env, "FLOWCHAT_REDIS_CLUSTER"),
            redis_sentinels=_addresses(env, "FLOWCHAT_REDIS_SENTINELS"),
            redis_sentinel_master=_text(env, "FLOWCHAT_REDIS_SENTINEL_MASTER"),
            redis_password=env.get("FLOWCHAT_REDIS_PASSWORD", ""),
            redis_sentinel_password=env.get("FLOWCHAT_REDIS_SENTINEL_PASSWORD", ""),
            redis_tls=_flag(env, "FLOWCHAT_REDIS_TLS", False),
            redis_tls_ca_file=_text(env, "FLOWCHAT_REDIS_TLS_CA_FILE"),
            retention_succeeded=_duration(env, "FLOWCHAT_RETENTION_SUCCEEDED", 24 * 3600.0),
            retention_failed=_duration(env, "FLOWCHAT_RETENTION_FAILED", 7 * 24 * 3600.0),
            dedupe_ttl=_duration(env, "FLOWCHAT_DEDUPE_TTL", 24 * 3600.0),
            compact_succeeded=_flag(env, "FLOWCHAT_COMPACT_SUCCEEDED", True),
            environ=env,
        )

    def env(self, name: str) -> str | None:
        """A variable a flow names itself (``token_env``, ``secret_env``); None when unset or empty."""
        return self.environ.get(name) or None

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests, command-line overrides)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **changes)
