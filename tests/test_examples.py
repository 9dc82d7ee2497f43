"""The docs cannot rot: every example and shipped flow runs, and the README lists every node."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flowchat import Execution, Runner, load_flow, load_registry, open_services
from flowchat.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted([*(ROOT / "examples").glob("*.yaml"), *(ROOT / "flows").glob("*.yaml")])


@pytest.fixture(scope="module")
def registry():
    from flowchat.services import service_names

    registry = load_registry(ROOT / "plugins", entry_points=False)
    registry.services |= service_names()  # the installed services (whatsapp, contacts, …) examples use
    return registry


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
async def test_every_example_flow_runs_to_success(path: Path, registry, redis_url: str, tmp_path: Path) -> None:
    flow = load_flow(path, registry)
    sample = path.with_suffix(".input.json")
    if not sample.exists():
        sample = ROOT / "examples" / f"{path.stem}.input.json"
    trigger = json.loads(sample.read_text())
    # as `flowchat run` does: the services the flow declares, on a Redis of the test's own
    settings = Settings(redis_url=redis_url, data_dir=tmp_path)
    async with open_services(settings, only=flow.services) as services:
        if flow.trigger.type == "twilio.message" and "contacts" in services:
            # ingress records an inbound message on its contact before the flow runs
            await services.get("contacts").record_inbound(
                trigger["From"],
                profile_name=trigger.get("ProfileName"),
                message_sid=trigger["MessageSid"],
                at_ms=int(time.time() * 1000),
            )
        execution = await Runner(services).run(flow, Execution.new(flow, trigger))
    assert execution.status == "succeeded", execution.error
    assert all(run.status in ("ok", "skipped") for run in execution.nodes.values())


def test_the_readme_documents_every_node_type(registry) -> None:
    readme = (ROOT / "README.md").read_text()
    for name in registry.names():
        assert f"| `{name}` |" in readme, f"README's node table misses {name}"
        summary = registry.types[name].summary()
        if not name.startswith("example."):
            assert summary in readme, f"README's summary of {name} differs from `flowchat nodes`"
