"""flowchat.loader: load-time validation, driven by a corpus of broken flows in ``broken/``, and defaults.

Each file there shows one kind of mistake and says, in its leading comments,
what the loader must report::

    # expect: CODE LINE:COL [FRAGMENT ...]   one reported error (repeat the line for more)
    # xfail: WHY                              a known engine bug; the expectation is the right one

Positions are 1-based and point at the offending value (at the key for an
unknown key, at the enclosing mapping for a missing one). FRAGMENTs, split
like a shell line, must all appear in the error's message. The errors reported
must be exactly the expected ones, so a file cannot quietly grow a second
mistake. Adding a file needs no code.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import run_cli, write_flow

from flowchat import FlowError, FlowInvalid, Registry, load_flow, load_registry

REPO = Path(__file__).resolve().parents[2]
BROKEN = Path(__file__).parent / "broken"


@dataclass(frozen=True)
class Expected:
    code: str
    line: int
    col: int
    fragments: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    path: Path
    expected: tuple[Expected, ...]
    xfail: str | None


def read_case(path: Path) -> Case:
    expected: list[Expected] = []
    xfail: str | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# expect:"):
            code, position, *fragments = shlex.split(line.removeprefix("# expect:"))
            row, col = position.split(":")
            expected.append(Expected(code, int(row), int(col), tuple(fragments)))
        elif line.startswith("# xfail:"):
            xfail = line.removeprefix("# xfail:").strip()
    return Case(path, tuple(expected), xfail)


CASES = [read_case(path) for path in sorted(BROKEN.glob("*.yaml"))]


def case_param(case: Case) -> object:
    marks = [pytest.mark.xfail(reason=case.xfail, strict=True)] if case.xfail else []
    return pytest.param(case, id=case.path.stem, marks=marks)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(plugins=REPO / "plugins", entry_points=False)


def test_corpus_covers_every_kind_of_mistake() -> None:
    assert len(CASES) >= 28
    assert all(case.expected for case in CASES), [case.path.name for case in CASES if not case.expected]
    codes = {expected.code for case in CASES for expected in case.expected}
    assert codes >= {
        "yaml-syntax",
        "yaml-duplicate-key",
        "flow-not-mapping",
        "missing-key",
        "unknown-key",
        "invalid-value",
        "duplicate-node-id",
        "unknown-node-type",
        "unknown-need",
        "cycle",
        "template-syntax",
        "template-unsafe",
        "template-not-upstream",
        "template-unknown-name",
    }


@pytest.mark.parametrize("case", [case_param(case) for case in CASES])
def test_broken_flow_is_reported_at_its_position(case: Case, registry: Registry) -> None:
    with pytest.raises(FlowInvalid) as raised:
        load_flow(case.path, registry)
    errors = raised.value.errors
    report = f"\n{raised.value}"

    got = sorted((error.code, error.location.line, error.location.col) for error in errors)
    assert got == sorted((e.code, e.line, e.col) for e in case.expected), report
    for expected in case.expected:
        error = next(
            error
            for error in errors
            if (error.code, error.location.line, error.location.col) == (expected.code, expected.line, expected.col)
        )
        assert isinstance(error, FlowError)
        assert error.location.file == str(case.path)
        assert str(error).startswith(f"{case.path}:{expected.line}:{expected.col}: [{expected.code}] "), report
        for fragment in expected.fragments:
            assert fragment in error.message, report


MANY_MISTAKES = """\
flow: many mistakes
trigger:
  type: schedule
  cron: "every day"
  timezone: Mars/Olympus
colour: blue
nodes:
  - id: start
    type: validat
    with:
      schema: {type: object}
  - id: greet
    type: log
    needs: [strat]
    with:
      level: loud
      message: "hi {{ trigger.name }"
  - id: greet
    type: log
    with:
      message: again
  - id: sneaky
    type: log
    bogus: true
    with:
      message: "{{ ''.__class__.__mro__ }}"
  - id: nosy
    type: set
    with:
      values: {x: "{{ later.x }}", y: "{{ contcat.name }}"}
  - id: later
    type: set
    with:
      values: {x: 1}
"""

MANY_MISTAKES_REPORTED = [
    ("invalid-value", 1, 7),  # flow name has a space
    ("invalid-value", 4, 9),  # cron
    ("invalid-value", 5, 13),  # timezone
    ("unknown-key", 6, 1),  # colour
    ("unknown-node-type", 9, 11),  # validat
    ("unknown-need", 14, 13),  # strat
    ("invalid-value", 16, 14),  # log level
    ("template-syntax", 17, 16),  # unclosed {{
    ("duplicate-node-id", 18, 9),  # greet again
    ("unknown-key", 24, 5),  # bogus
    ("template-unsafe", 26, 16),  # __class__
    ("template-not-upstream", 30, 19),  # later is below nosy
    ("template-unknown-name", 30, 39),  # contcat
]


@pytest.fixture
def many_mistakes(tmp_path: Path) -> Path:
    path = tmp_path / "many.yaml"
    path.write_text(MANY_MISTAKES, encoding="utf-8")
    return path


def test_every_mistake_of_a_file_is_reported_at_once_sorted_by_position(
    many_mistakes: Path, registry: Registry
) -> None:
    with pytest.raises(FlowInvalid) as raised:
        load_flow(many_mistakes, registry)
    errors = raised.value.errors

    reported = [(error.code, error.location.line, error.location.col) for error in errors]
    assert reported == MANY_MISTAKES_REPORTED, f"\n{raised.value}"
    assert len({code for code, _, _ in reported}) >= 5
    assert str(raised.value).splitlines() == [str(error) for error in errors]


def test_cli_validate_prints_each_problem_with_its_position_and_exits_1(
    many_mistakes: Path, registry: Registry
) -> None:
    with pytest.raises(FlowInvalid) as raised:
        load_flow(many_mistakes, registry)

    result = run_cli("validate", many_mistakes)

    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert lines[:-1] == [str(error) for error in raised.value.errors]
    assert all(line.startswith(f"{many_mistakes}:") for line in lines[:-1])
    assert lines[-1] == f"{len(MANY_MISTAKES_REPORTED)} problem(s) found"
    assert f"{many_mistakes}:9:11: [unknown-node-type] unknown node type 'validat'" in result.stderr


def test_cli_validate_accepts_the_shipped_flows() -> None:
    folders = ["flows"]
    if any((REPO / "examples").rglob("*.y*ml")):
        folders.append("examples")

    result = run_cli("validate", *folders)

    assert result.returncode == 0, result.stderr
    assert "ok  flows/lead_intake.yaml" in result.stdout


def test_a_node_retry_merges_with_its_type_defaults_field_by_field(flows_dir, registry):
    path = write_flow(
        flows_dir,
        "merge",
        """
        - {id: call, type: http.request, with: {url: 'http://127.0.0.1:1/'}, retry: {backoff: 5s}}
        - {id: plain, type: http.request, with: {url: 'http://127.0.0.1:1/'}}
        - {id: once, type: http.request, with: {url: 'http://127.0.0.1:1/'}, retry: {max_attempts: 1}}
        """,
    )
    flow = load_flow(path, registry)

    defaults = flow.nodes["plain"].retry
    assert (defaults.max_attempts, defaults.backoff, defaults.max_backoff) == (3, 1.0, 60.0)
    merged = flow.nodes["call"].retry
    assert (merged.max_attempts, merged.backoff, merged.max_backoff) == (3, 5.0, 60.0)
    assert flow.nodes["once"].retry.max_attempts == 1 and flow.nodes["once"].retry.max_backoff == 60.0
