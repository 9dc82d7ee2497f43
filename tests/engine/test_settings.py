"""Settings are read in one place and documented in one table (README "Settings")."""

from __future__ import annotations

import re

from support import ROOT

from flowchat import settings
from flowchat.settings import Settings, secret_values

ENGINE = ROOT / "engine"


def readme_settings_table() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Settings\n", 1)[1]
    return section.split("\n#", 1)[0]


def test_every_variable_settings_reads_is_in_the_readme_table():
    source = (ENGINE / "settings.py").read_text()
    read = set(re.findall(r'"((?:FLOWCHAT|TWILIO)_[A-Z_]+)"', source))
    table = readme_settings_table()

    assert read, "settings.py reads no variables: the pattern above went stale"
    missing = sorted(name for name in read if f"`{name}`" not in table)
    assert not missing, f"README's Settings table misses {missing}"


def test_only_settings_reads_the_environment():
    # PATH is the operating system's lookup for redis-server, not a FlowChat setting; the
    # ingress reads the variable a flow names for its webhook secret (the ingress work moves it).
    allowed = {"settings.py", "redis_server.py", "ingress.py"}
    readers = sorted(
        f"{path.parent.name}/{path.name}"
        for folder in (ENGINE, ROOT / "nodes")
        for path in folder.glob("*.py")
        if path.name not in allowed and re.search(r"os\.environ|getenv", path.read_text())
    )
    assert not readers, f"read the environment through flowchat.settings instead: {readers}"


def test_secret_values_are_the_long_values_of_secret_looking_names():
    environ = {
        "CRM_API_TOKEN": "tok-5ecr3t-value",
        "db_password": "hunter2-hunter2",
        "SIGNING_KEY": "short",  # under 8 characters: would mask too much
        "HOME": "/home/flowchat-user",
    }

    assert sorted(secret_values(environ)) == ["hunter2-hunter2", "tok-5ecr3t-value"]
    assert settings.SECRET_MARKERS == ("TOKEN", "SECRET", "PASSWORD", "KEY")


def test_from_env_keeps_the_documented_defaults():
    assert Settings.from_env({}) == Settings()
