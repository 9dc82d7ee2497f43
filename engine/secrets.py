"""Secrets for flow authors: ``{{ secrets.API_TOKEN }}`` in templates, never stored or logged.

Values come from ``FLOWCHAT_SECRET_<NAME>`` environment variables and, when
``FLOWCHAT_SECRETS_FILE`` is set, from that file's ``NAME=value`` lines (the
environment wins). A flow referring to a secret that is not set loads with a
warning and fails at run time with ``secret-missing`` naming it, never a value.

Every value is replaced by ``***`` in node outputs and errors before they are
stored, and in log lines (:meth:`Secrets.mask`), so a token sent in an
``http.request`` header and echoed back by the server does not reach Redis,
logs or ``flowchat executions show``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes

from flowchat.errors import NodeError
from flowchat.settings import Settings, SettingsError
from flowchat.templates import ENVIRONMENT, Template

ENV_PREFIX = "FLOWCHAT_SECRET_"
MASK = "***"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SecretMissing(NodeError):
    """A template read ``secrets.NAME`` and no such secret is set."""

    code = "secret-missing"


class Secrets:
    """The secret values of one process, and the masking of them."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = {name: value for name, value in (values or {}).items() if value}
        # longest first, so a secret containing another is masked whole
        ordered = sorted(set(self._values.values()), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self.view = SecretView(self)

    @classmethod
    def from_settings(cls, settings: Settings) -> Secrets:
        """``FLOWCHAT_SECRET_*`` from the settings' environment over ``settings.secrets_file``."""
        values = read_secrets_file(Path(settings.secrets_file)) if settings.secrets_file else {}
        for key, value in settings.environ.items():
            if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
                values[key[len(ENV_PREFIX) :]] = value
        return cls(values)

    def names(self) -> set[str]:
        return set(self._values)

    def values(self) -> list[str]:
        return list(self._values.values())

    def get(self, name: str) -> str:
        """The value of ``name``; :class:`SecretMissing` names it when unset."""
        try:
            return self._values[name]
        except KeyError:
            raise SecretMissing(
                f"secrets.{name} is not set (set {ENV_PREFIX}{name}, or a {name}= line in FLOWCHAT_SECRETS_FILE)"
            ) from None

    def __bool__(self) -> bool:
        return bool(self._values)

    def mask_text(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(MASK, text)

    def mask(self, value: Any) -> Any:
        """``value`` with every secret replaced by ``***`` in its strings, keys included."""
        if self._pattern is None:
            return value
        return _mask(value, self._pattern)


def _mask(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(MASK, value)
    if isinstance(value, dict):
        return {_mask(key, pattern): _mask(item, pattern) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(item, pattern) for item in value]
    return value


class SecretView:
    """What templates see as ``secrets``: ``secrets.NAME`` or ``secrets["NAME"]``, nothing else.

    No iteration, no listing, and its text form shows no value.
    """

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Secrets) -> None:
        self._secrets = secrets

    def __getattr__(self, name: str) -> str:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._secrets.get(name)

    def __getitem__(self, name: str) -> str:
        return self._secrets.get(name)

    def __repr__(self) -> str:
        return "<secrets>"

    __str__ = __repr__


def read_secrets_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines; blank lines and ``#`` comments skipped. Errors name the line, never a value."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"FLOWCHAT_SECRETS_FILE={path}: cannot read: {type(exc).__name__}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, separator, value = stripped.partition("=")
        name = name.strip()
        if not separator or not _NAME.match(name):
            raise SettingsError(f"FLOWCHAT_SECRETS_FILE={path}:{number}: expected NAME=value")
        values[name] = value.strip()
    return values


# --- which secrets a flow refers to ----------------------------------------------------


def referenced_secrets(templates: Iterable[Template]) -> set[str]:
    """Names read as ``secrets.NAME`` or ``secrets["NAME"]`` in ``templates``."""
    found: set[str] = set()
    for template in templates:
        if "secrets" not in template.names:
            continue
        try:
            tree = ENVIRONMENT.parse(template.source)
        except jinja2.TemplateSyntaxError:
            continue
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            if isinstance(node, nodes.Getattr) and _is_secrets(node.node):
                found.add(node.attr)
            elif (
                isinstance(node, nodes.Getitem)
                and _is_secrets(node.node)
                and isinstance(node.arg, nodes.Const)
                and isinstance(node.arg.value, str)
            ):
                found.add(node.arg.value)
    return found


def flow_secrets(flows: Iterable[Any]) -> dict[str, set[str]]:
    """The secrets each flow reads, by flow name (``flows`` are loaded :class:`~flowchat.flow.Flow` objects)."""
    return {flow.name: flow.secrets for flow in flows if flow.secrets}


def _is_secrets(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.name == "secrets"


def unset_secret_warnings(flow_secrets: Mapping[str, Iterable[str]], secrets: Secrets) -> list[str]:
    """One warning per flow and secret it reads that is not set: ``flow 'x' reads secrets.NAME, ...``."""
    available = secrets.names()
    return [
        f"[secret-missing] flow {flow!r} reads secrets.{name}, which is not set "
        f"({ENV_PREFIX}{name} or FLOWCHAT_SECRETS_FILE); its executions will fail at that node"
        for flow, names in sorted(flow_secrets.items())
        for name in sorted(set(names) - available)
    ]
