"""flowchat.schema: the flow schema ships in the package; `flowchat schema` prints the types in effect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from support import ROOT, daemon_env, run_cli

from flowchat.registry import Registry
from flowchat.schema import FLOW_SCHEMA_ID, flow_schema, packaged_schema


def schema_from(cwd: Path, *args: str, **env: str) -> dict[str, object]:
    environ = daemon_env("unused", **env)
    environ.pop("FLOWCHAT_PLUGINS", None)
    environ.update(env)
    result = run_cli("schema", *args, env=environ, cwd=cwd)
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


# --- the schema `flowchat schema` prints, as editors and CI use it ------------------------


@pytest.fixture(scope="module")
def printed_schema() -> Draft202012Validator:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_schema_accepts_every_shipped_flow(printed_schema):
    files = sorted((ROOT / "flows").glob("*.y*ml")) + sorted((ROOT / "examples").glob("*.y*ml"))

    assert files
    for file in files:
        errors = [error.message for error in printed_schema.iter_errors(yaml.safe_load(file.read_text()))]
        assert errors == [], file


@pytest.mark.parametrize(
    ("config", "valid"),
    [
        ({"message": "hi"}, True),
        ({"message": "hi {{ trigger.name }}", "level": "{{ vars.level }}"}, True),
        ({"bogus": 1}, False),
        ({"message": "hi", "bogus": 1}, False),
        ({"message": "hi", "level": "loud"}, False),
    ],
)
def test_schema_checks_each_node_types_with(printed_schema, config, valid):
    flow = {"flow": "f", "trigger": {"type": "webhook"}, "nodes": [{"id": "note", "type": "log", "with": config}]}

    assert printed_schema.is_valid(flow) is valid


def test_schema_rejects_an_unknown_node_type(printed_schema):
    flow = {"flow": "f", "trigger": {"type": "webhook"}, "nodes": [{"id": "x", "type": "sms.send"}]}

    assert not printed_schema.is_valid(flow)


def test_the_committed_flow_schema_is_what_flowchat_schema_prints():
    result = run_cli("--plugins", "plugins", "schema")
    assert result.returncode == 0, result.stderr
    committed = (ROOT / "flowchat.schema.json").read_text()
    assert json.loads(committed) == json.loads(result.stdout), (
        "run: flowchat --plugins plugins schema > flowchat.schema.json "
        "&& flowchat schema --builtins-only > engine/flow.schema.json"
    )
