"""Built-in nodes and the plugins folder use only the plugin API (`flowchat.PLUGIN_API`, `flowchat.testing`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import flowchat

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "nodes").glob("*.py"), *(ROOT / "plugins").glob("*.py")])
PUBLIC_MODULES = {"flowchat.testing"}


def private_imports(tree: ast.AST) -> list[str]:
    """Every import of FlowChat that is not on the plugin API, as written."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] in ("flowchat", "engine", "nodes")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                found.append(f"{'.' * node.level}{module}")
            elif module == "flowchat":
                found += [f"flowchat.{a.name}" for a in node.names if a.name not in flowchat.PLUGIN_API]
            elif module.split(".")[0] in ("flowchat", "engine", "nodes") and module not in PUBLIC_MODULES:
                found.append(module)
    return found


@pytest.mark.parametrize("path", SOURCES, ids=[f"{p.parent.name}/{p.name}" for p in SOURCES])
def test_nodes_and_plugins_import_only_the_plugin_api(path: Path) -> None:
    assert private_imports(ast.parse(path.read_text(encoding="utf-8"))) == []


def test_the_check_catches_private_imports() -> None:
    source = (
        "import flowchat.runner\nfrom flowchat.queue import Queue\nfrom flowchat import Runner, Node\nfrom . import x\n"
    )
    assert private_imports(ast.parse(source)) == ["flowchat.runner", "flowchat.queue", "flowchat.Runner", "."]


def test_every_plugin_api_name_is_exported() -> None:
    assert set(flowchat.PLUGIN_API) <= set(flowchat.__all__)
    assert all(hasattr(flowchat, name) for name in flowchat.PLUGIN_API)
