"""flowchat.graph: a flow's ``needs`` drawn as a Mermaid flowchart by ``flowchat graph``."""

from support import run_cli, write_flow

LEAD_FLOW = "flows/lead_intake.yaml"


def test_graph_draws_a_mermaid_flowchart_with_an_edge_per_need():
    result = run_cli("graph", LEAD_FLOW)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "flowchart TD"
    edges = sorted(line.strip() for line in lines if "->" in line)
    # boxes are n_<id> (no id can be a Mermaid keyword); a conditional edge is labelled with its condition
    assert edges == sorted(
        ["trigger --> n_check", "n_check --> n_lead", 'n_lead -.->|"lead.score #gt;= 20"| n_hot', "n_lead --> n_done"]
    )


def test_graph_keeps_mermaid_keywords_as_node_ids_apart(tmp_path):
    flow = write_flow(
        tmp_path,
        "words",
        """
        - {id: graph, type: set, with: {values: {}}}
        - {id: end, type: log, with: {message: bye}, when: "{{ graph.x == 'a|b' }}"}
        """,
    )
    result = run_cli("graph", flow)

    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert 'n_graph["graph<br/><small>set</small>"]' in lines
    assert "trigger --> n_graph" in lines
    assert "n_graph -.->|\"graph.x == 'a#124;b'\"| n_end" in lines
