"""flowchat.registry: where node types come from (the plugins folder, installed entry points) and what goes wrong."""

import ast
import sys
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import install_dist, write_flow

import flowchat

REPO = Path(__file__).resolve().parents[2]
GREETING = REPO / "plugins" / "greeting.py"
MODULE_PREFIXES = ("flowchat_plugins.", "flowchat_example_greeting", "fc_takes_set")

GREETING_NODES = """
- id: hello
  type: example.greeting
  with: {name: "{{ trigger.name }}", language: es}
"""


@pytest.fixture(autouse=True)
def forget_plugin_modules() -> Iterator[None]:
    """Plugin modules imported by a test do not leak into the next one."""
    before = set(sys.modules)
    yield
    for name in [name for name in sys.modules if name.startswith(MODULE_PREFIXES) and name not in before]:
        del sys.modules[name]


@pytest.fixture
def write_plugin(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write ``<name>.py`` with ``source`` into a fresh plugins folder; return the file."""
    folder = tmp_path / "plugins"
    folder.mkdir()

    def write(name: str, source: str) -> Path:
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return path

    return write


def node_plugin(node_type: str, class_name: str = "Plugged") -> str:
    return f"""
    from flowchat import Node, NodeConfig, register

    @register
    class {class_name}(Node):
        \"\"\"A test plugin node.\"\"\"

        type = "{node_type}"

        async def run(self, ctx, config):
            return {{"from": __name__}}
    """


async def run_greeting(registry: flowchat.Registry, path: Path) -> flowchat.Execution:
    flow = flowchat.load_flow(path, registry)
    return await flowchat.Runner().run(flow, flowchat.Execution.new(flow, {"name": "Ana"}))


# --- discovery ----------------------------------------------------------------------


async def test_the_example_plugin_loads_from_the_folder_given_to_load_registry(tmp_path):
    registry = flowchat.load_registry(REPO / "plugins", entry_points=False)

    assert registry.errors == []
    assert "example.greeting" in registry.names()
    assert registry.sources["example.greeting"] == f"plugin {GREETING}"
    execution = await run_greeting(registry, write_flow(tmp_path, "greet", GREETING_NODES))
    assert execution.status == "succeeded"
    assert execution.nodes["hello"].output == {"text": "Hola, Ana!"}


def test_the_plugins_folder_comes_from_flowchat_plugins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./plugins here
    monkeypatch.delenv("FLOWCHAT_PLUGINS", raising=False)
    assert "example.greeting" not in flowchat.load_registry().names()

    monkeypatch.setenv("FLOWCHAT_PLUGINS", str(REPO / "plugins"))
    registry = flowchat.load_registry()

    assert "example.greeting" in registry.names()
    assert str(GREETING) in registry.sources["example.greeting"]
    assert "set" in registry.names()  # built-ins are still there


def test_the_plugins_folder_defaults_to_plugins_in_the_working_directory(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("FLOWCHAT_PLUGINS", raising=False)

    registry = flowchat.load_registry()

    assert "example.greeting" in registry.names()


@pytest.fixture
def installed_greeting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example plugin installed as a distribution with a ``flowchat.nodes`` entry point."""
    site = tmp_path / "site-packages"
    dist_info = site / "flowchat_example-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: flowchat-example\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[flowchat.nodes]\ngreeting = flowchat_example_greeting\n")
    (site / "flowchat_example_greeting.py").write_text(GREETING.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    return site


async def test_an_installed_entry_point_provides_node_types(installed_greeting, tmp_path):
    registry = flowchat.load_registry(tmp_path / "no-plugins-folder")

    assert registry.errors == []
    source = registry.sources["example.greeting"]
    assert source.startswith("entry point greeting")
    assert "flowchat-example" in source
    assert "flowchat_example_greeting" in source
    assert registry.types["example.greeting"].__module__ == "flowchat_example_greeting"
    execution = await run_greeting(registry, write_flow(tmp_path, "greet", GREETING_NODES))
    assert execution.nodes["hello"].output == {"text": "Hola, Ana!"}


def test_entry_points_can_be_turned_off(installed_greeting, tmp_path):
    registry = flowchat.load_registry(tmp_path / "no-plugins-folder", entry_points=False)

    assert "example.greeting" not in registry.names()


# --- broken and clashing plugins ----------------------------------------------------


def test_a_plugin_that_fails_to_import_is_reported_and_flows_needing_it_are_refused(write_plugin, tmp_path):
    broken = write_plugin("fc_broken_crm", 'raise RuntimeError("CRM_URL is not set")\n')
    write_plugin("fc_fine_neighbour", node_plugin("fc.fine"))

    registry = flowchat.load_registry(broken.parent, entry_points=False)

    (error,) = registry.errors
    assert error.code == "plugin-import-failed"
    assert str(broken) in error.message
    assert "RuntimeError: CRM_URL is not set" in error.message
    assert isinstance(error.__cause__, RuntimeError)
    assert "flowchat_plugins.fc_broken_crm" not in sys.modules
    assert "fc.fine" in registry.names()  # one broken plugin does not take the others down

    path = write_flow(tmp_path, "f", "- {id: sync, type: fc.crm_sync}")
    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, registry)
    (problem,) = caught.value.errors
    assert problem.code == "unknown-node-type"
    assert "'fc.crm_sync'" in problem.message
    assert "failed to import" in problem.message
    assert str(broken) in problem.message
    assert (problem.location.file, problem.location.line) == (str(path), 4)


def test_two_modules_declaring_one_type_clash_and_flows_using_it_are_refused(write_plugin, tmp_path):
    first = write_plugin("fc_dup_first", node_plugin("fc.dup", "First"))
    second = write_plugin("fc_dup_second", node_plugin("fc.dup", "Second"))
    write_plugin("fc_dup_bystander", node_plugin("fc.bystander"))

    registry = flowchat.load_registry(first.parent, entry_points=False)

    (error,) = registry.errors
    assert error.code == "plugin-duplicate-type"
    assert "'fc.dup'" in error.message
    assert str(first) in error.message
    assert str(second) in error.message
    assert "fc.dup" not in registry.names()
    assert registry.get("fc.dup") is None
    assert "fc.bystander" in registry.names()

    path = write_flow(tmp_path, "f", "- {id: x, type: fc.dup}")
    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, registry)
    (problem,) = caught.value.errors
    assert problem.code == "node-type-conflict"
    assert str(second) in problem.message


def test_a_plugin_cannot_take_a_built_in_type_name_and_the_built_in_keeps_working(write_plugin, tmp_path):
    plugin = write_plugin("fc_own_log", node_plugin("log"))

    registry = flowchat.load_registry(plugin.parent, entry_points=False)

    (error,) = registry.errors
    assert error.code == "plugin-builtin-type"
    assert str(plugin) in error.message
    assert "'log'" in error.message and "built-in flowchat.nodes.data" in error.message
    assert registry.sources["log"] == "built-in flowchat.nodes.data"
    path = write_flow(tmp_path, "f", "- {id: x, type: log, with: {message: hi}}")
    flow = flowchat.load_flow(path, registry)
    assert flow.nodes["x"].node.__module__ == "flowchat.nodes.data"


async def test_an_installed_plugin_cannot_take_a_built_in_type_name(tmp_path, monkeypatch):
    site = install_dist(
        tmp_path / "site",
        "fc-takes-set",
        {"fc_takes_set": textwrap.dedent(node_plugin("set"))},
        {"flowchat.nodes": {"set": "fc_takes_set"}},
    )
    monkeypatch.syspath_prepend(str(site))

    registry = flowchat.load_registry(tmp_path / "no-plugins")

    (error,) = registry.errors
    assert error.code == "plugin-builtin-type"
    assert "fc-takes-set" in error.message
    assert registry.types["set"].__module__ == "flowchat.nodes.data"


def test_a_node_class_left_without_register_is_reported_by_name(write_plugin, tmp_path):
    plugin = write_plugin(
        "fc_forgot",
        """
        from flowchat import Node, NodeConfig, register

        class Base(Node):
            \"\"\"A shared base without a type of its own is not a node.\"\"\"

        class Forgotten(Base):
            type = "fc.forgotten"

            async def run(self, ctx, config):
                return {}
        """,
    )

    registry = flowchat.load_registry(plugin.parent, entry_points=False)

    (error,) = registry.errors
    assert error.code == "plugin-unregistered-node"
    assert "class Forgotten" in error.message and "@register" in error.message and str(plugin) in error.message
    path = write_flow(tmp_path, "f", "- {id: x, type: fc.forgotten}")
    with pytest.raises(flowchat.FlowInvalid) as caught:
        flowchat.load_flow(path, registry)
    (problem,) = caught.value.errors
    assert problem.code == "unknown-node-type"
    assert "class Forgotten" in problem.message


def test_built_ins_come_from_entry_points_one_per_module_of_nodes():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    declared = pyproject["project"]["entry-points"]["flowchat.nodes"]
    modules = {path.stem for path in (REPO / "nodes").glob("*.py") if not path.name.startswith("_")}
    assert {value.removeprefix("flowchat.nodes.") for value in declared.values()} == modules
    registry = flowchat.Registry()
    registry.load_builtins()
    assert registry.errors == []
    assert {"set", "log", "delay", "http.request", "validate"} <= registry.builtins
    assert {"contacts", "whatsapp"} <= registry.services  # the engine's own services come with its nodes
    assert all(source.startswith("built-in flowchat.nodes.") for source in registry.sources.values())


def test_the_engine_never_imports_the_nodes_package():
    for path in (REPO / "engine").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            assert not any(name == "flowchat.nodes" or name.startswith("flowchat.nodes.") for name in names), path
