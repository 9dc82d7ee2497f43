"""The catalog: flow versions executions run on, rebuilt from stored YAML, in a bounded cache."""

from __future__ import annotations

from support import flow_yaml, write_flow

from flowchat.catalog import Catalog
from flowchat.secrets import Secrets


async def test_stored_versions_are_cached_up_to_a_bound(flows_dir, registry):
    catalog = Catalog(flows_dir, registry, max_versions=2)
    catalog.reload()
    sources = {f"v{n}": ("old.yaml", flow_yaml("old", [{"id": f"a{n}", "type": "test.noop"}])) for n in range(4)}
    looked_up: list[str] = []

    async def lookup(name: str, version: str) -> tuple[str, str] | None:
        looked_up.append(version)
        return sources.get(version)

    for version in sources:
        flow = await catalog.flow_at("old", version, lookup)
        assert flow is not None and list(flow.nodes) == [f"a{version[1:]}"]
    assert len(catalog._versions) == 2
    await catalog.flow_at("old", "v3", lookup)  # recent: still cached
    await catalog.flow_at("old", "v0", lookup)  # dropped: rebuilt
    assert looked_up == ["v0", "v1", "v2", "v3", "v0"]
    assert await catalog.flow_at("old", "gone", lookup) is None


async def test_the_current_version_needs_no_lookup(flows_dir, registry):
    write_flow(flows_dir, "now", "- {id: a, type: test.noop}")
    catalog = Catalog(flows_dir, registry, max_versions=1)
    catalog.reload()
    current = catalog.get("now")
    assert current is not None

    async def lookup(name: str, version: str) -> None:
        raise AssertionError("the loaded version is at hand")

    for _ in range(3):
        assert await catalog.flow_at("now", current.version, lookup) is current


def test_a_flow_reloaded_later_that_reads_an_unset_secret_is_warned_about(flows_dir, registry, caplog):
    catalog = Catalog(flows_dir, registry, secrets=Secrets({"KNOWN": "value-1"}))
    catalog.reload()
    reads = [{"id": "a", "type": "set", "with": {"values": {"k": "{{ secrets.KNOWN }}", "u": "{{ secrets.NEW_ONE }}"}}}]
    write_flow(flows_dir, "later", reads)
    catalog.reload()
    warned = [r.getMessage() for r in caplog.records if "secret-missing" in r.getMessage()]
    assert warned == [
        "[secret-missing] flow 'later' reads secrets.NEW_ONE, which is not set "
        "(FLOWCHAT_SECRET_NEW_ONE or FLOWCHAT_SECRETS_FILE); its executions will fail at that node"
    ]
    assert catalog.get("later") is not None and catalog.flows == {"later": catalog.get("later")}
