"""`python -m bench [--quick]`: queue, ingress, latency, cost and memory against same-run baselines.

Starts its own redis-server (AOF on, as the daemon runs it), prints a table and writes
the same numbers to bench/results/latest.json. Targets are printed beside each number;
missing one does not fail the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis as sync_redis

from bench.harness import NOOP_FLOW, Bench, noop_nodes
from bench.report import print_table, rows

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def run(bench: Bench, only: set[str] | None = None) -> None:
    """Every row (or the steps named in ``only``), in the order of the table; how long each took goes into the results."""
    steps: list[tuple[str, Callable[[], object]]] = [
        ("baseline", bench.baseline),
        ("queue_noop1", lambda: bench.queue_drain("noop1")),
        ("queue_noop5", lambda: bench.queue_drain("noop5")),
        ("queue_noop1_2_workers", lambda: bench.queue_drain("noop1", workers=2)),
        ("queue_lead_intake", lambda: bench.queue_drain("lead_intake")),
        ("ingress", bench.ingress),
        ("ingress_twilio", bench.ingress_twilio),
        ("latency", bench.latency),
        ("crm", bench.crm_rows),
        ("sink", lambda: sink_step(bench)),
    ]
    seconds = bench.results.setdefault("step_seconds", {})
    for name, step in steps:
        if only and name not in only:
            continue
        started = time.time()
        result = step()
        if result is not None:
            bench.results[name] = result
        seconds[name] = round(time.time() - started, 1)


def sink_step(bench: Bench) -> dict[str, object]:
    """The analytics sink draining the events stream, beside a raw DuckDB Arrow insert (bench/sink.py)."""
    bench.flush()
    out, _ = bench.spawn("-m", "bench.sink", bench.url, str(bench.n(200_000, 30_000))).communicate(timeout=600)
    return dict(json.loads(out))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in under a minute")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="only the Redis Cluster rows: a local 3-master cluster, 1 and 2 partitions",
    )
    parser.add_argument(
        "--only",
        metavar="STEPS",
        help="comma-separated steps to run (baseline, queue_noop1, queue_noop5, queue_noop1_2_workers, "
        "queue_lead_intake, ingress, ingress_twilio, latency, crm, sink); results go to a separate file",
    )
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if args.cluster:
        return cluster_main()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="flowchat-bench-") as workdir:
        bench = Bench(args.quick, Path(workdir))
        try:
            run(bench, only)
            redis_version = bench.redis_version()
        finally:
            bench.close()
    results = bench.results
    if only:  # a partial run has no full table: print the raw numbers
        print(json.dumps(results, indent=2))
        RESULTS.with_name("only.json").write_text(json.dumps(results, indent=2))
        return 0
    table = rows(results)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis_server": redis_version,
        "redis_py": sync_redis.__version__,
        "quick": args.quick,
        "seconds": round(time.time() - started, 1),
    }
    print_table(table)
    machine = results["machine"]
    print(
        f"({machine['cpus']} CPUs, load average {machine['load_average_at_end']:.1f}, Python {machine['python']}, "
        f"Redis {machine['redis_server']}, {machine['seconds']} s)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    return 0


def cluster_main(count: int = 20_000) -> int:
    """``--cluster``: queue throughput on a local Cluster (bench/results/cluster.json)."""
    from bench import cluster

    with tempfile.TemporaryDirectory(prefix="flowchat-bench-") as workdir:
        flows = Path(workdir) / "flows"
        flows.mkdir()
        (flows / "noop1.yaml").write_text(NOOP_FLOW.format(name="noop1", nodes=noop_nodes(1)))
        results = cluster.run(Path(workdir), flows, count)
    table = cluster.rows(results)
    print_table(table)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    (RESULTS.parent / "cluster.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
