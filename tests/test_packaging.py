"""The package as users get it: `pip install .` into a fresh venv, `pip install -e .`, and a plugin package.

The fresh venv borrows this venv's third-party packages through a path file (no downloads):
what it gets from this repo is only what `pip install` puts there. The plugin package is the
one the README shows, file by file, so the guide cannot rot: it is installed next to the engine,
discovered through its entry points, type-checked with `mypy --strict` against the installed
`flowchat` (py.typed) and its own tests, written with `flowchat.testing`, pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
README_FILE = re.compile(r"```(?:toml|python)\n# file: (?P<path>\S+)\n(?P<body>.*?)```", re.S)


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWCHAT_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


def copy_sources(into: Path) -> Path:
    """The repo's tracked files (a build writes build/ and egg-info next to its sources)."""
    files = run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    return into


def decoy_project(folder: Path) -> Path:
    """A user project with its own engine.py and nodes/ package, both of which explode on import."""
    folder.mkdir()
    (folder / "engine.py").write_text("raise SystemExit('the project engine.py was imported')\n")
    (folder / "nodes").mkdir()
    (folder / "nodes" / "__init__.py").write_text("raise SystemExit('the project nodes/ was imported')\n")
    return folder


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with `pip install --no-deps .` of a copy of this repo."""
    base = tmp_path_factory.mktemp("packaging")
    venv = base / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=base).returncode == 0
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=base).stdout.strip())
    # third-party dependencies from this venv; path lines do not run its .pth files (our editable hook)
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = copy_sources(base / "source")
    installed = run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        source,
        cwd=base,
    )
    assert installed.returncode == 0, installed.stderr
    yield venv


def test_a_fresh_install_is_the_flowchat_package_and_nothing_named_engine_or_nodes(venv, tmp_path):
    python = venv / "bin" / "python"
    project = decoy_project(tmp_path / "project")

    found = run(python, "-c", "import flowchat; from flowchat import Node; print(flowchat.__file__)", cwd=project)

    assert found.returncode == 0, found.stderr
    assert str(venv) in found.stdout
    site = Path(found.stdout.strip()).parent.parent
    assert not (site / "engine").exists() and not (site / "nodes").exists()
    assert (site / "flowchat" / "py.typed").is_file() and (site / "flowchat" / "flow.schema.json").is_file()
    for name in ("engine", "nodes"):
        missing = run(python, "-c", f"import {name}", cwd=Path("/"), env=clean_env())
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr


def test_the_editable_install_also_keeps_a_project_engine_py_apart(tmp_path):
    # this venv is the editable install (`pip install -e ".[test]"`, as CI does)
    project = decoy_project(tmp_path / "project")

    found = run(
        sys.executable, "-c", "import flowchat; from flowchat import Node; print(flowchat.__file__)", cwd=project
    )

    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(ROOT / "engine" / "__init__.py")
    for name in ("engine", "nodes"):
        assert run(sys.executable, "-c", f"import {name}", cwd=Path("/"), env=clean_env()).returncode != 0


def readme_plugin(into: Path) -> Path:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for match in README_FILE.finditer(readme):
        path = into / match["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(match["body"], encoding="utf-8")
    assert (into / "pyproject.toml").is_file() and (into / "tests").is_dir()
    return into


def test_the_readme_plugin_package_installs_is_discovered_type_checks_and_its_tests_pass(venv, tmp_path):
    python, flowchat = venv / "bin" / "python", venv / "bin" / "flowchat"
    plugin = readme_plugin(tmp_path / "flowchat-shout")
    installed = run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        plugin,
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    listed = run(flowchat, "nodes", "--json", cwd=elsewhere, env=clean_env())
    assert listed.returncode == 0, listed.stderr
    shout = next(entry for entry in json.loads(listed.stdout) if entry["type"] == "text.shout")
    assert shout["source"].startswith("entry point shout (flowchat-shout")
    assert "warning" not in listed.stderr

    typed = run(
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--python-executable",
        python,
        "--cache-dir",
        tmp_path / "mypy",
        plugin / "flowchat_shout.py",
        ROOT / "plugins" / "greeting.py",
        cwd=elsewhere,
        env=clean_env(),
    )
    assert typed.returncode == 0, typed.stdout + typed.stderr

    tested = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=plugin, env=clean_env())
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "2 passed" in tested.stdout


def test_pyproject_states_the_real_floors():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    requirements = {Requirement(line).name: Requirement(line) for line in declared}

    assert not requirements["redis"].specifier.contains("5.2.1")
    assert requirements["redis"].specifier.contains("5.3.0")
    assert {"pydantic", "pyyaml", "jinja2", "aiohttp", "redis", "twilio", "duckdb", "jsonschema"} <= set(requirements)
