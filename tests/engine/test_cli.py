"""The ``flowchat`` command line, run as a user runs it: in a subprocess from the repo root."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from support import ROOT, cli_env, daemon_env, finish_cli, run_cli, start_cli, write_flow

LEAD_FLOW = "flows/lead_intake.yaml"
PHONE = "+14155550123"
LEAD = {"phone": PHONE, "name": "ann lee", "interests": ["solar", "batteries"]}
BUILT_IN_TYPES = ("set", "log", "validate", "http.request", "example.greeting")


@pytest.fixture
def lead_file(tmp_path: Path) -> Callable[[dict], Path]:
    def write(payload: dict) -> Path:
        path = tmp_path / "lead.json"
        path.write_text(json.dumps(payload), encoding="utf-8")
        return path

    return write


# --- run ----------------------------------------------------------------------------


def test_run_with_an_input_file_prints_the_trace(lead_file):
    result = run_cli("run", LEAD_FLOW, "--input", str(lead_file(LEAD)))

    assert result.returncode == 0, result.stderr
    first, header, *rows = result.stdout.splitlines()
    assert first.split()[::2] == ["execution", "flow", "status"]
    assert first.split()[3:] == ["lead_intake", "status", "succeeded"]
    assert header.split() == ["node", "status", "attempts", "ms", "result"]
    statuses = {row.split()[0]: row.split()[1] for row in rows}
    assert statuses == {"check": "ok", "lead": "ok", "hot": "ok", "done": "ok"}
    assert '"name": "Ann Lee"' in result.stdout
    assert '"score": 20' in result.stdout
    # the warning logged by `hot` reaches stderr with the phone number masked
    assert "hot lead for Acme: Ann Lee (+1415***0123), score 20" in result.stderr
    assert PHONE not in result.stderr


def test_run_reads_the_input_from_stdin():
    result = run_cli("run", LEAD_FLOW, "--input", "-", input=json.dumps({**LEAD, "interests": []}))

    assert result.returncode == 0, result.stderr
    statuses = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[2:]}
    assert statuses == {"check": "ok", "lead": "ok", "hot": "skipped", "done": "ok"}


def test_run_json_prints_the_execution_as_json(lead_file):
    result = run_cli("run", LEAD_FLOW, "--input", str(lead_file(LEAD)), "--json")

    assert result.returncode == 0, result.stderr
    execution = json.loads(result.stdout)
    assert execution["status"] == "succeeded"
    assert execution["flow"] == "lead_intake"
    assert execution["nodes"]["lead"]["output"] == {
        "phone": PHONE,
        "name": "Ann Lee",
        "interests": ["solar", "batteries"],
        "score": 20,
    }
    assert execution["nodes"]["check"]["output"] == {"valid": True, "errors": []}


def test_run_exits_1_when_the_input_fails_validation(lead_file):
    result = run_cli("run", LEAD_FLOW, "--input", str(lead_file({"phone": "555-0100"})))

    assert result.returncode == 1
    assert "status failed" in result.stdout
    assert "[validation-failed] 2 validation error(s)" in result.stdout
    assert "error: node check: [validation-failed]" in result.stdout
    statuses = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[2:5]}
    assert statuses == {"check": "failed", "lead": "pending", "hot": "pending"}


def test_run_rejects_input_that_is_not_a_json_object():
    result = run_cli("run", LEAD_FLOW, "--input", "-", input="[1, 2]")

    assert result.returncode == 2
    assert "must be a JSON object" in result.stderr


def test_run_reports_a_missing_input_file_without_a_traceback(tmp_path):
    missing = tmp_path / "missing.json"

    result = run_cli("run", LEAD_FLOW, "--input", str(missing))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: --input: " in result.stderr
    assert str(missing) in result.stderr


# --- nodes -----------------------------------------------------------


def test_nodes_lists_every_built_in_type():
    result = run_cli("nodes")

    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith(" ")}
    assert set(BUILT_IN_TYPES) <= listed
    assert "Send an HTTP request" in result.stdout


def test_nodes_json_includes_each_config_schema():
    result = run_cli("nodes", "--json")

    assert result.returncode == 0, result.stderr
    entries = {entry["type"]: entry for entry in json.loads(result.stdout)}
    assert set(BUILT_IN_TYPES) <= set(entries)
    for entry in entries.values():
        Draft202012Validator.check_schema(entry["config_schema"])
        assert entry["config_schema"]["additionalProperties"] is False
        assert entry["summary"]
    assert entries["http.request"]["config_schema"]["required"] == ["url"]
    assert {"url", "json", "headers", "timeout"} <= set(entries["http.request"]["config_schema"]["properties"])
    assert entries["example.greeting"]["source"].endswith("plugins/greeting.py")


# --- help ---------------------------------------------------------------------------

SUBCOMMAND_PURPOSES = {
    "validate": "check flow files",
    "run": "run one flow",
    "nodes": "list node types",
    "schema": "JSON Schema",
    "graph": "Mermaid",
}


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess[str]]:
    """``--help`` of the program and of each subcommand, started all at once to keep the suite fast."""
    started = {"": start_cli("--help"), **{name: start_cli(name, "--help") for name in SUBCOMMAND_PURPOSES}}
    return {name: finish_cli(process) for name, process in started.items()}


def test_help_lists_the_subcommands_and_their_purpose(helps):
    result = helps[""]

    assert result.returncode == 0
    assert "FlowChat" in result.stdout
    text = " ".join(result.stdout.split()).lower()
    for name, purpose in SUBCOMMAND_PURPOSES.items():
        assert name in text
        assert purpose.lower() in text


@pytest.mark.parametrize("name", sorted(SUBCOMMAND_PURPOSES))
def test_each_subcommand_help_says_what_it_does(helps, name):
    result = helps[name]

    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: flowchat {name}")
    assert SUBCOMMAND_PURPOSES[name].lower() in " ".join(result.stdout.split()).lower()


# --- `run` does what the daemon does ---------------------------------------------------------


def test_run_fast_forward_skips_a_long_delay_and_retry_backoff(tmp_path):
    flow = write_flow(
        tmp_path,
        "later",
        """
        - {id: wait, type: delay, with: {for: 1h}}
        - {id: call, type: http.request, with: {url: 'http://127.0.0.1:9/'}, retry: {backoff: 10m}}
        """,
    )
    result = run_cli("run", flow, "--fast-forward", "--json")

    execution = json.loads(result.stdout)
    assert execution["nodes"]["wait"]["status"] == "ok"
    assert execution["nodes"]["call"]["attempts"] == 3  # the default max_attempts, backoff skipped
    assert execution["nodes"]["call"]["error"]["code"] == "http-connection"


def test_run_checks_the_webhook_schema_and_gives_schedules_their_payload(tmp_path):
    hook = write_flow(
        tmp_path,
        "hook",
        "- {id: a, type: set, with: {values: {p: '{{ trigger.phone }}'}}}",
        trigger="{type: webhook, schema: {type: object, required: [phone]}}",
    )
    refused = run_cli("run", hook, "--input", "-", input='{"name": "Ana"}')
    assert refused.returncode == 2
    assert "does not match the trigger schema" in refused.stderr and "'phone' is a required property" in refused.stderr
    assert "Traceback" not in refused.stderr

    tick = write_flow(
        tmp_path,
        "tick",
        "- {id: a, type: set, with: {values: {t: '{{ trigger.team }}', m: '{{ trigger.missed }}'}}}",
        trigger="{type: schedule, cron: '0 9 * * *', payload: {team: support}}",
    )
    execution = json.loads(run_cli("run", tick, "--json").stdout)
    assert execution["trigger"]["team"] == "support" and "tick" in execution["trigger"]
    assert execution["nodes"]["a"]["output"] == {"t": "support", "m": 0}


def test_cli_tables_mask_phone_numbers(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, "p", '- {id: s, type: set, with: {values: {phone: "{{ trigger.phone }}"}}}')
    (tmp_path / "in.json").write_text('{"phone": "020 7946 0958"}')
    result = run_cli("run", flow, "--input", tmp_path / "in.json", env=cli_env(FLOWCHAT_DEFAULT_REGION="GB"))
    assert result.returncode == 0, result.stderr
    assert "+4420***0958" in result.stdout
    assert "7946 0958" not in result.stdout


def test_run_tables_mask_phones_and_json_keeps_them(redis_url: str) -> None:
    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "run", "flows/welcome.yaml", "-i", "examples/welcome.input.json", *extra, env=daemon_env(redis_url)
        )

    table = run()
    assert table.returncode == 0, table.stderr
    assert "+1415***0142" in table.stdout and "4155550142" not in table.stdout
    as_json = json.loads(run("--json").stdout)
    assert as_json["nodes"]["contact"]["output"]["phone"] == "+14155550142"
    assert as_json["nodes"]["once_a_day"]["output"]["allowed"] is False  # the second run today


def test_run_into_a_closed_pipe_ends_quietly(tmp_path):
    reader, writer = os.pipe()
    os.close(reader)
    result = subprocess.run(
        [sys.executable, "-m", "flowchat.cli", "run", LEAD_FLOW, "--json"],
        cwd=ROOT,
        stdout=writer,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    os.close(writer)
    assert result.returncode == 141
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
