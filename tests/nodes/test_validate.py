"""The ``validate`` node: JSON Schema checks with JSON paths, inline or from a file."""

import json
import os
import time

import pytest

import flowchat

PHONE = r"^\\+[1-9]\\d{7,14}$"  # as written in YAML double quotes: ^\+[1-9]\d{7,14}$


def validate_node(on_invalid: str = "fail") -> str:
    """A ``check`` node validating the trigger as a lead."""
    return f"""
    - id: check
      type: validate
      with:
        on_invalid: {on_invalid}
        schema:
          type: object
          required: [phone, name]
          properties:
            phone: {{type: string, pattern: "{PHONE}"}}
            name: {{type: string, minLength: 1}}
            age: {{type: integer, minimum: 0}}
    """


async def test_valid_data_outputs_valid_true_and_no_errors(run_flow):
    execution = await run_flow(validate_node(), {"phone": "+14155550123", "name": "Ann"})

    assert execution.status == "succeeded"
    assert execution.nodes["check"].output == {"valid": True, "errors": []}


async def test_invalid_data_fails_the_node_naming_the_json_path(run_flow):
    execution = await run_flow(validate_node("fail"), {"phone": "555", "name": "Ann"})

    assert execution.status == "failed"
    assert execution.error["node"] == "check"
    assert execution.error["code"] == "validation-failed"
    assert "$.phone" in execution.error["message"]
    assert execution.nodes["check"].attempts == 1


async def test_on_invalid_continue_outputs_errors_for_downstream_nodes(run_flow):
    branch = """
    - id: reject
      type: set
      when: "{{ not check.valid }}"
      with:
        values: {first_error: "{{ check.errors[0].path }}"}
    """
    execution = await run_flow(validate_node("continue") + branch, {"phone": "555", "name": "Ann"})

    assert execution.status == "succeeded"
    output = execution.nodes["check"].output
    assert output["valid"] is False
    assert [error["path"] for error in output["errors"]] == ["$.phone"]
    assert "does not match" in output["errors"][0]["message"]
    assert execution.nodes["reject"].output == {"first_error": "$.phone"}


async def test_every_error_is_reported_at_once(run_flow):
    trigger = {"phone": "555", "age": -3}  # bad phone, bad age, no name

    continued = await run_flow(validate_node("continue"), trigger)
    failed = await run_flow(validate_node("fail"), trigger)

    errors = continued.nodes["check"].output["errors"]
    assert [error["path"] for error in errors] == ["$", "$.age", "$.phone"]
    assert "'name' is a required property" in errors[0]["message"]
    message = failed.error["message"]
    assert message.startswith("3 validation error(s)")
    assert all(path in message for path in ("$.age", "$.phone", "'name' is a required property"))


async def test_data_selects_what_to_validate_and_nested_paths_are_reported(run_flow):
    nodes = """
    - id: check
      type: validate
      with:
        data: "{{ trigger.contact }}"
        on_invalid: continue
        schema:
          type: object
          properties:
            address:
              type: object
              properties: {zip: {type: string}}
    """
    execution = await run_flow(nodes, {"contact": {"address": {"zip": 94107}}})

    assert execution.nodes["check"].output["errors"][0]["path"] == "$.address.zip"


async def test_schema_file_is_read_relative_to_the_flow_file(run_flow, write_flow, tmp_path, monkeypatch):
    flows = tmp_path / "project" / "flows"
    (flows / "schemas").mkdir(parents=True)
    (flows / "schemas" / "lead.json").write_text(
        json.dumps({"type": "object", "required": ["phone"], "properties": {"phone": {"type": "string"}}})
    )
    path = write_flow(
        """
        - id: check
          type: validate
          with: {schema_file: schemas/lead.json, on_invalid: continue}
        """,
        folder=flows,
    )
    monkeypatch.chdir(tmp_path)  # not the flow's folder: the path must not depend on the cwd

    good = await run_flow(path, {"phone": "+14155550123"})
    bad = await run_flow(path, {"phone": 14155550123})

    assert good.nodes["check"].output == {"valid": True, "errors": []}
    assert bad.nodes["check"].output["errors"][0]["path"] == "$.phone"


def test_a_missing_schema_file_is_refused_when_the_flow_loads(write_flow, builtin_registry):
    path = write_flow(
        """
        - id: check
          type: validate
          with: {schema_file: nowhere.json}
        """
    )

    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, builtin_registry)

    [error] = caught.value.errors
    assert error.code == "schema-file-invalid"
    assert "nowhere.json" in error.message


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/etc/passwd", "outside the flow's folder"),
        ("../../etc/passwd", "outside the flow's folder"),
        ("/dev/zero", "outside the flow's folder"),
        ("fifo.json", "not a regular file"),
        ("link.json", "outside the flow's folder"),
        ("big.json", "over the limit"),
        ("{{ trigger.schema }}", "may not be a template"),
    ],
)
def test_schema_file_is_confined_to_the_flow_folder_and_read_at_load_time(write_flow, builtin_registry, name, why):
    path = write_flow(
        f"""
        - id: check
          type: validate
          with: {{schema_file: "{name}"}}
        """
    )
    os.mkfifo(path.parent / "fifo.json")
    (path.parent / "link.json").symlink_to("/etc/hostname")
    (path.parent / "big.json").write_text('{"description": "' + "x" * (1024 * 1024) + '"}')

    started = time.monotonic()
    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, builtin_registry)

    assert time.monotonic() - started < 2
    [error] = caught.value.errors
    assert (error.code, error.location.line) == ("schema-file-invalid", 7)
    assert why in error.message


def test_an_invalid_inline_schema_is_refused_when_the_flow_loads(write_flow, builtin_registry):
    path = write_flow(
        """
        - id: check
          type: validate
          with: {schema: {type: 12}}
        """
    )

    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, builtin_registry)

    (problem,) = caught.value.errors
    assert problem.code == "invalid-value"
    assert "not a valid JSON Schema" in problem.message
    assert problem.location.file == str(path)
    assert problem.location.line == 7


def test_exactly_one_of_schema_and_schema_file_is_required(write_flow, builtin_registry):
    path = write_flow(
        """
        - id: check
          type: validate
          with: {on_invalid: continue}
        """
    )

    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, builtin_registry)

    assert "exactly one of schema or schema_file" in str(caught.value)
