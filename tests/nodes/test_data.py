"""The data nodes: ``set`` (native-typed values) and ``log`` (execution-tagged, masked lines)."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from flowchat.logs import RedactingFilter, configure_logging

PHONE = "+14155550123"
MASKED = "+1415***0123"


async def test_set_renders_templates_to_native_types(run_flow):
    execution = await run_flow(
        """
        - id: lead
          type: set
          with:
            values:
              count: "{{ trigger.n + 1 }}"
              ratio: "{{ trigger.n / 4 }}"
              tags: "{{ trigger.tags }}"
              hot: "{{ trigger.n > 1 }}"
              nothing: "{{ trigger.missing | default(none) }}"
              greeting: "hi {{ trigger.name }}"
              literal: 7
              nested: {n: "{{ trigger.n }}", items: ["{{ trigger.name | upper }}", 2]}
        - id: double
          type: set
          with:
            values: {count: "{{ lead.count * 2 }}", first_tag: "{{ lead.tags[0] }}"}
        """,
        {"n": 2, "tags": ["vip", "es"], "name": "Ann"},
    )

    assert execution.status == "succeeded"
    assert execution.nodes["lead"].output == {
        "count": 3,
        "ratio": 0.5,
        "tags": ["vip", "es"],
        "hot": True,
        "nothing": None,
        "greeting": "hi Ann",
        "literal": 7,
        "nested": {"n": 2, "items": ["ANN", 2]},
    }
    assert execution.nodes["double"].output == {"count": 6, "first_tag": "vip"}


async def test_set_with_an_undefined_name_fails_naming_the_expression(run_flow):
    execution = await run_flow(
        """
        - id: lead
          type: set
          with: {values: {phone: "{{ trigger.phone }}"}}
        """,
        {},
    )

    assert execution.status == "failed"
    assert execution.error["code"] == "template-undefined"
    assert "trigger.phone" in execution.error["message"]


LOG_NODE = """
- id: note
  type: log
  with:
    level: warning
    message: "new lead {{ trigger.name }} ({{ trigger.phone }})"
"""


async def test_log_writes_one_line_with_execution_and_node_ids(run_flow, caplog):
    caplog.set_level(logging.DEBUG, logger="flowchat")

    execution = await run_flow(LOG_NODE, {"name": "Ann", "phone": "n/a"}, execution_id="exec-log-1")

    assert execution.nodes["note"].output == {"message": "new lead Ann (n/a)"}
    lines = [record for record in caplog.records if "new lead" in record.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelname == "WARNING"
    assert lines[0].getMessage() == "exec-log-1 note new lead Ann (n/a)"


@pytest.fixture
def redacting_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog whose handler redacts like the CLI's (pytest reuses that handler: remove the filter after)."""
    redact = RedactingFilter()
    caplog.handler.addFilter(redact)
    yield caplog
    caplog.handler.removeFilter(redact)


async def test_log_masks_phone_numbers_through_the_redacting_filter(run_flow, redacting_caplog):
    caplog = redacting_caplog
    caplog.set_level(logging.INFO, logger="flowchat")

    await run_flow(LOG_NODE, {"name": "Ann", "phone": PHONE}, execution_id="exec-log-2")

    assert "exec-log-2 note new lead Ann" in caplog.text
    assert MASKED in caplog.text
    assert PHONE not in caplog.text


async def test_log_lines_are_masked_without_configure_logging(run_flow, caplog):
    caplog.set_level(logging.INFO, logger="flowchat")

    await run_flow(LOG_NODE, {"name": "Ann", "phone": PHONE}, execution_id="exec-log-4")

    assert "exec-log-4 note new lead Ann" in caplog.text
    assert PHONE not in caplog.text


@contextmanager
def cli_logging() -> Iterator[None]:
    """Logging as the CLI configures it, undone afterwards (pytest's own handlers come back)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("INFO")
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_configure_logging_masks_phones_and_secrets_on_stderr(run_flow, capsys, monkeypatch):
    monkeypatch.setenv("CRM_API_TOKEN", "tok-5ecr3t-value")
    nodes = """
    - id: note
      type: log
      with: {message: "calling {{ trigger.phone }} with tok-5ecr3t-value"}
    """

    with cli_logging():
        await run_flow(nodes, {"phone": PHONE}, execution_id="exec-log-3")

    err = capsys.readouterr().err
    assert f"exec-log-3 note calling {MASKED} with ***" in err
    assert PHONE not in err
    assert "tok-5ecr3t-value" not in err
