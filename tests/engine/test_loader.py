"""Loading flows: defaults a flow's node settings merge with."""

from __future__ import annotations

from support import write_flow

from flowchat.loader import load_flow


def test_a_node_retry_merges_with_its_type_defaults_field_by_field(flows_dir, registry):
    path = write_flow(
        flows_dir,
        "merge",
        "  - {id: call, type: http.request, with: {url: 'http://127.0.0.1:1/'}, retry: {backoff: 5s}}\n"
        "  - {id: plain, type: http.request, with: {url: 'http://127.0.0.1:1/'}}\n"
        "  - {id: once, type: http.request, with: {url: 'http://127.0.0.1:1/'}, retry: {max_attempts: 1}}\n",
    )
    flow = load_flow(path, registry)

    defaults = flow.nodes["plain"].retry
    assert (defaults.max_attempts, defaults.backoff, defaults.max_backoff) == (3, 1.0, 60.0)
    merged = flow.nodes["call"].retry
    assert (merged.max_attempts, merged.backoff, merged.max_backoff) == (3, 5.0, 60.0)
    assert flow.nodes["once"].retry.max_attempts == 1 and flow.nodes["once"].retry.max_backoff == 60.0
