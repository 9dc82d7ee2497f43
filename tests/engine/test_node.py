"""flowchat.node: the node SDK. ``register`` checks a node class's declaration when it is decorated."""

import pytest
from pydantic import BaseModel

import flowchat


def test_register_accepts_a_well_formed_node():
    class Fine(flowchat.Node):
        type = "fc.register_fine"

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            return {}

    assert flowchat.register(Fine) is Fine


def test_register_rejects_a_node_whose_run_is_not_async():
    class Sync(flowchat.Node):
        type = "fc.register_sync"

        def run(self, ctx, config):  # type: ignore[override]
            return {}

    with pytest.raises(flowchat.PluginError) as caught:
        flowchat.register(Sync)

    assert caught.value.code == "plugin-invalid-node"
    assert "Sync.run must be an `async def`" in caught.value.message


def test_register_rejects_a_node_without_run():
    class Lazy(flowchat.Node):
        type = "fc.register_lazy"

    with pytest.raises(flowchat.PluginError) as caught:
        flowchat.register(Lazy)

    assert caught.value.code == "plugin-invalid-node"


def test_register_rejects_a_node_without_a_type():
    class Nameless(flowchat.Node):
        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            return {}

    with pytest.raises(flowchat.PluginError) as caught:
        flowchat.register(Nameless)

    assert caught.value.code == "plugin-invalid-node"
    assert "must set a `type` string" in caught.value.message


def test_register_rejects_a_config_that_allows_extra_keys():
    class Loose(flowchat.Node):
        type = "fc.register_loose"

        class Config(BaseModel):
            name: str

        async def run(self, ctx: flowchat.NodeContext, config: BaseModel) -> dict:
            return {}

    with pytest.raises(flowchat.PluginError) as caught:
        flowchat.register(Loose)

    assert caught.value.code == "plugin-invalid-node"
    assert "forbid extra keys" in caught.value.message


def test_register_rejects_a_class_that_is_not_a_node():
    class Stranger:
        type = "fc.register_stranger"

        async def run(self, ctx: flowchat.NodeContext, config: flowchat.NodeConfig) -> dict:
            return {}

    with pytest.raises(flowchat.PluginError) as caught:
        flowchat.register(Stranger)  # type: ignore[type-var]

    assert caught.value.code == "plugin-invalid-node"
    assert "must subclass flowchat.Node" in caught.value.message
