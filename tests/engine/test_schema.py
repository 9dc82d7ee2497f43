"""flowchat.schema: the flow schema ships in the package; `flowchat schema` prints the types in effect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import daemon_env

from flowchat.registry import Registry
from flowchat.schema import FLOW_SCHEMA_ID, flow_schema, packaged_schema

ROOT = Path(__file__).resolve().parents[2]


def schema_from(cwd: Path, *args: str, **env: str) -> dict[str, object]:
    environ = daemon_env("unused", **env)
    environ.pop("FLOWCHAT_PLUGINS", None)
    environ.update(env)
    result = subprocess.run(
        [sys.executable, "-m", "flowchat.cli", "schema", *args], cwd=cwd, env=environ, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    printed: dict[str, object] = json.loads(result.stdout)
    return printed


def node_types(schema: dict[str, object]) -> list[str]:
    nodes = schema["properties"]["nodes"]["items"]  # type: ignore[index]
    return list(nodes["properties"]["type"]["enum"])  # type: ignore[index]


def test_the_packaged_schema_covers_the_built_ins_and_is_current():
    builtins = Registry()
    builtins.load_builtins()

    shipped = packaged_schema()

    assert shipped["$id"] == FLOW_SCHEMA_ID
    assert node_types(shipped) == builtins.names()
    assert shipped == flow_schema(builtins), "run: flowchat schema --builtins-only > engine/flow.schema.json"


def test_flowchat_schema_is_the_same_from_any_folder_given_the_same_settings(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    plugins = str(ROOT / "plugins")

    here = schema_from(ROOT, FLOWCHAT_PLUGINS=plugins)
    there = schema_from(elsewhere, FLOWCHAT_PLUGINS=plugins)
    flag = schema_from(elsewhere, "--builtins-only", FLOWCHAT_PLUGINS=plugins)

    assert here == there
    assert "example.greeting" in node_types(there)  # the plugins folder in effect
    assert here["$id"] == FLOW_SCHEMA_ID
    assert flag == packaged_schema()
    assert schema_from(elsewhere) == packaged_schema()  # no plugins folder there, nothing else installed
