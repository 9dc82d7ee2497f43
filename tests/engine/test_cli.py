"""The ``flowchat`` command line, run as a user runs it: in a subprocess from the repo root."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

REPO = Path(__file__).resolve().parents[2]
LEAD_FLOW = "flows/lead_intake.yaml"
PHONE = "+14155550123"
LEAD = {"phone": PHONE, "name": "ann lee", "interests": ["solar", "batteries"]}
BUILT_IN_TYPES = ("set", "log", "validate", "http.request", "example.greeting")

Cli = Callable[..., subprocess.CompletedProcess[str]]


def start(*args: str) -> subprocess.Popen[str]:
    """Start ``python -m flowchat.cli ARGS`` in the repo root, with no FLOWCHAT_* settings from the environment."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLOWCHAT_")}
    return subprocess.Popen(
        [sys.executable, "-m", "flowchat.cli", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(stdin, timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def cli() -> Cli:
    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return finish(start(*args), stdin)

    return run


@pytest.fixture
def lead_file(tmp_path: Path) -> Callable[[dict], Path]:
    def write(payload: dict) -> Path:
        path = tmp_path / "lead.json"
        path.write_text(json.dumps(payload), encoding="utf-8")
        return path

    return write


# --- run ----------------------------------------------------------------------------


def test_run_with_an_input_file_prints_the_trace(cli, lead_file):
    result = cli("run", LEAD_FLOW, "--input", str(lead_file(LEAD)))

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


def test_run_reads_the_input_from_stdin(cli):
    result = cli("run", LEAD_FLOW, "--input", "-", stdin=json.dumps({**LEAD, "interests": []}))

    assert result.returncode == 0, result.stderr
    statuses = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[2:]}
    assert statuses == {"check": "ok", "lead": "ok", "hot": "skipped", "done": "ok"}


def test_run_json_prints_the_execution_as_json(cli, lead_file):
    result = cli("run", LEAD_FLOW, "--input", str(lead_file(LEAD)), "--json")

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


def test_run_exits_1_when_the_input_fails_validation(cli, lead_file):
    result = cli("run", LEAD_FLOW, "--input", str(lead_file({"phone": "555-0100"})))

    assert result.returncode == 1
    assert "status failed" in result.stdout
    assert "[validation-failed] 2 validation error(s)" in result.stdout
    assert "error: node check: [validation-failed]" in result.stdout
    statuses = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[2:5]}
    assert statuses == {"check": "failed", "lead": "pending", "hot": "pending"}


def test_run_rejects_input_that_is_not_a_json_object(cli):
    result = cli("run", LEAD_FLOW, "--input", "-", stdin="[1, 2]")

    assert result.returncode == 2
    assert "must be a JSON object" in result.stderr


def test_run_reports_a_missing_input_file_without_a_traceback(cli, tmp_path):
    missing = tmp_path / "missing.json"

    result = cli("run", LEAD_FLOW, "--input", str(missing))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: --input: " in result.stderr
    assert str(missing) in result.stderr


# --- nodes, schema, graph -----------------------------------------------------------


def test_nodes_lists_every_built_in_type(cli):
    result = cli("nodes")

    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith(" ")}
    assert set(BUILT_IN_TYPES) <= listed
    assert "Send an HTTP request" in result.stdout


def test_nodes_json_includes_each_config_schema(cli):
    result = cli("nodes", "--json")

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


@pytest.fixture(scope="module")
def flow_schema(cli) -> Draft202012Validator:
    result = cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_schema_accepts_every_shipped_flow(flow_schema):
    files = sorted((REPO / "flows").glob("*.y*ml")) + sorted((REPO / "examples").glob("*.y*ml"))

    assert files
    for file in files:
        errors = [error.message for error in flow_schema.iter_errors(yaml.safe_load(file.read_text()))]
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
def test_schema_checks_each_node_types_with(flow_schema, config, valid):
    flow = {"flow": "f", "trigger": {"type": "webhook"}, "nodes": [{"id": "note", "type": "log", "with": config}]}

    assert flow_schema.is_valid(flow) is valid


def test_schema_rejects_an_unknown_node_type(flow_schema):
    flow = {"flow": "f", "trigger": {"type": "webhook"}, "nodes": [{"id": "x", "type": "sms.send"}]}

    assert not flow_schema.is_valid(flow)


def test_graph_draws_a_mermaid_flowchart_with_an_edge_per_need(cli):
    result = cli("graph", LEAD_FLOW)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "flowchart TD"
    edges = sorted(line.strip() for line in lines if "->" in line)
    # boxes are n_<id> (no id can be a Mermaid keyword); a conditional edge is labelled with its condition
    assert edges == sorted(
        ["trigger --> n_check", "n_check --> n_lead", 'n_lead -.->|"lead.score #gt;= 20"| n_hot', "n_lead --> n_done"]
    )


def test_graph_keeps_mermaid_keywords_as_node_ids_apart(cli, tmp_path):
    flow = tmp_path / "words.yaml"
    flow.write_text(
        "flow: words\ntrigger: {type: webhook}\nnodes:\n"
        "  - {id: graph, type: set, with: {values: {}}}\n"
        "  - {id: end, type: log, with: {message: bye}, when: \"{{ graph.x == 'a|b' }}\"}\n"
    )
    result = cli("graph", str(flow))

    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert 'n_graph["graph<br/><small>set</small>"]' in lines
    assert "trigger --> n_graph" in lines
    assert "n_graph -.->|\"graph.x == 'a#124;b'\"| n_end" in lines


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
    started = {"": start("--help"), **{name: start(name, "--help") for name in SUBCOMMAND_PURPOSES}}
    return {name: finish(process) for name, process in started.items()}


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


def test_the_committed_flow_schema_is_what_flowchat_schema_prints():
    result = subprocess.run(
        [sys.executable, "-m", "flowchat.cli", "--plugins", "plugins", "schema"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    committed = (REPO / "flowchat.schema.json").read_text()
    assert json.loads(committed) == json.loads(result.stdout), (
        "run: flowchat --plugins plugins schema > flowchat.schema.json "
        "&& flowchat schema --builtins-only > engine/flow.schema.json"
    )


# --- `run` does what the daemon does ---------------------------------------------------------


def test_run_fast_forward_skips_a_long_delay_and_retry_backoff(cli, tmp_path):
    flow = tmp_path / "later.yaml"
    flow.write_text(
        "flow: later\ntrigger: {type: webhook}\nnodes:\n"
        "  - {id: wait, type: delay, with: {for: 1h}}\n"
        "  - {id: call, type: http.request, with: {url: 'http://127.0.0.1:9/'}, retry: {backoff: 10m}}\n"
    )
    result = cli("run", str(flow), "--fast-forward", "--json")

    execution = json.loads(result.stdout)
    assert execution["nodes"]["wait"]["status"] == "ok"
    assert execution["nodes"]["call"]["attempts"] == 3  # the default max_attempts, backoff skipped
    assert execution["nodes"]["call"]["error"]["code"] == "http-connection"


def test_run_checks_the_webhook_schema_and_gives_schedules_their_payload(cli, tmp_path):
    hook = tmp_path / "hook.yaml"
    hook.write_text(
        "flow: hook\ntrigger: {type: webhook, schema: {type: object, required: [phone]}}\n"
        "nodes:\n  - {id: a, type: set, with: {values: {p: '{{ trigger.phone }}'}}}\n"
    )
    refused = cli("run", str(hook), "--input", "-", stdin='{"name": "Ana"}')
    assert refused.returncode == 2
    assert "does not match the trigger schema" in refused.stderr and "'phone' is a required property" in refused.stderr
    assert "Traceback" not in refused.stderr

    tick = tmp_path / "tick.yaml"
    tick.write_text(
        "flow: tick\ntrigger: {type: schedule, cron: '0 9 * * *', payload: {team: support}}\n"
        "nodes:\n  - {id: a, type: set, with: {values: {t: '{{ trigger.team }}', m: '{{ trigger.missed }}'}}}\n"
    )
    execution = json.loads(cli("run", str(tick), "--json").stdout)
    assert execution["trigger"]["team"] == "support" and "tick" in execution["trigger"]
    assert execution["nodes"]["a"]["output"] == {"t": "support", "m": 0}


def test_run_into_a_closed_pipe_ends_quietly(tmp_path):
    reader, writer = os.pipe()
    os.close(reader)
    result = subprocess.run(
        [sys.executable, "-m", "flowchat.cli", "run", LEAD_FLOW, "--json"],
        cwd=REPO,
        stdout=writer,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    os.close(writer)
    assert result.returncode == 141
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
