"""Flow files written to hurt: each one is a problem report, quickly, and never takes the daemon down."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from support import daemon_env, flow_yaml, run_cli, wait_for, write_flow

from flowchat import FlowInvalid, Registry, load_flow
from flowchat.catalog import Catalog
from flowchat.loader import MAX_FLOW_BYTES
from flowchat.redis_server import free_port


def good(name: str) -> str:
    """A valid flow on webhook path ``name``."""
    hello = {"id": "hello", "type": "set", "with": {"values": {"n": 1}}}
    return flow_yaml(name, [hello], trigger={"type": "webhook", "path": name})


LAUGHS = "".join(
    f"{chr(97 + level)}: &{chr(97 + level)} [{', '.join([f'*{chr(96 + level)}'] * 9) if level else '1, 2, 3, 4, 5, 6, 7, 8, 9'}]\n"
    for level in range(9)
)


def with_template(expression: str, name: str = "tpl") -> str:
    return flow_yaml(name, [{"id": "a", "type": "log", "with": {"message": expression}}])


def templates_reading(count: int) -> dict[str, str]:
    """``{v0: "{{ trigger.v0 }}", v1: ...}``: ``count`` values, each a template."""
    return {f"v{i}": "{{ trigger.v" + str(i) + " }}" for i in range(count)}


HOSTILE: dict[str, tuple[Callable[[], str | bytes], str]] = {
    "billion_laughs": (lambda: LAUGHS, "yaml-limit"),
    "recursive_alias": (lambda: "x: &a [1, *a]\n", "yaml-alias"),
    "deep_nesting": (lambda: "x: " + "[" * 400 + "]" * 400 + "\n", "yaml-limit"),
    "deep_mapping": (lambda: "".join("  " * i + f"k{i}:\n" for i in range(300)) + "  " * 300 + "v\n", "yaml-limit"),
    "python_name_tag": (lambda: "flow: !!python/name:os.system x\n", "yaml-tag"),
    "python_object_tag": (lambda: "flow: !!python/object/apply:os.system [id]\n", "yaml-tag"),
    "bad_int_tag": (lambda: "flow: !!int abc\n", "yaml-tag"),
    "timestamp_tag": (lambda: "flow: !!timestamp 2020-99-99\n", "yaml-tag"),
    "local_tag": (lambda: "flow: !foo bar\n", "yaml-tag"),
    "collection_tag": (lambda: "flow: !!set {a, b}\n", "yaml-tag"),
    "huge_int": (lambda: "flow: " + "9" * 100_000 + "\n", "yaml-limit"),
    "too_large": (lambda: "# " + "x" * (MAX_FLOW_BYTES + 10) + "\n", "flow-too-large"),
    "not_utf8": (lambda: b"flow: \xff\xfe\n", "flow-unreadable"),
    "string_times_billion": (lambda: with_template("{{ 'a' * 1000000000 }}"), "template-limit"),
    "power_tower": (lambda: with_template("{{ 10 ** 100000000 }}"), "template-limit"),
    "huge_range": (lambda: with_template("{{ range(1000000000) | list }}"), "template-limit"),
    "huge_lipsum": (lambda: with_template("{{ lipsum(10000000) }}"), "template-limit"),
    "unknown_filter": (lambda: with_template("{{ trigger.x | b64encode }}"), "template-unknown-filter"),
    "unknown_test": (lambda: with_template("{{ trigger.x is nmber }}"), "template-unknown-test"),
    "deep_template": (lambda: with_template("{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}"), "template-limit"),
    "too_many_values": (lambda: "vars:\n  x: [" + ",".join(["1"] * 60_000) + "]\n", "yaml-limit"),
    "too_many_nodes": (
        lambda: flow_yaml("many", [{"id": f"n{i}", "type": "log", "with": {"message": "hi"}} for i in range(1001)]),
        "flow-limit",
    ),
    "too_many_templates": (
        lambda: flow_yaml("many", [{"id": "s", "type": "set", "with": {"values": templates_reading(1001)}}]),
        "flow-limit",
    ),
    "two_documents": (lambda: good("twice") + "---\n" + good("again"), "yaml-syntax"),
}


def write(path: Path, content: str | bytes) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_flow_file_is_a_quick_problem_report(name: str, tmp_path: Path, registry: Registry) -> None:
    make, code = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    write(path, make())

    started = time.monotonic()
    with pytest.raises(FlowInvalid) as caught:
        load_flow(path, registry)

    assert time.monotonic() - started < 2
    assert code in {error.code for error in caught.value.errors}, caught.value
    assert all(error.location.file == str(path) and error.location.line for error in caught.value.errors)


def test_a_fifo_or_device_is_not_read(tmp_path: Path, registry: Registry) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(FlowInvalid) as caught:
            load_flow(path, registry)
        assert caught.value.errors[0].code == "flow-unreadable"


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_loading_a_flow_a_thousand_times_keeps_memory_flat(tmp_path: Path, registry: Registry) -> None:
    nodes = [{"id": f"n{i}", "type": "set", "with": {"values": {"i": i, "s": "x" * 4000}}} for i in range(4)]
    path = write_flow(tmp_path, "leak", nodes)  # ~16 KB of text per load
    for _ in range(100):  # warm caches (pydantic, jinja) and the allocator first
        load_flow(path, registry)
    gc.collect()
    before = rss_bytes()
    for _ in range(1000):
        load_flow(path, registry)
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 4_000_000, f"memory grew by {grown} bytes over 1,000 loads"


def test_validate_reports_every_hostile_file_without_a_traceback(tmp_path: Path) -> None:
    folder = tmp_path / "flows"
    folder.mkdir()
    for name, (make, _) in HOSTILE.items():
        write(folder / f"{name}.yaml", make())
    write(folder / "good.yaml", good("good"))

    result = run_cli("validate", folder)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for name, (_, code) in HOSTILE.items():
        assert f"{name}.yaml:" in result.stderr and f"[{code}]" in result.stderr, name


def test_the_catalog_survives_any_error_and_keeps_the_previous_versions(
    flows_dir: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    (flows_dir / "good.yaml").write_text(good("good"))
    catalog = Catalog(flows_dir, registry)
    catalog.reload()

    def exhausted(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("flowchat.catalog.flow_files", exhausted)

    async def one_round() -> None:
        watcher = asyncio.create_task(catalog.watch(interval=0.01))
        await asyncio.sleep(0.1)
        assert not watcher.done()
        watcher.cancel()

    asyncio.run(one_round())
    assert catalog.get("good") is not None


async def healthz_latency(port: int, http: aiohttp.ClientSession) -> float:
    started = time.monotonic()
    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
        assert response.status == 200
    return time.monotonic() - started


async def test_the_daemon_keeps_serving_while_hostile_files_arrive(redis_url, flows_dir, processes):
    (flows_dir / "good.yaml").write_text(good("good"))
    (flows_dir / "broken.yaml").write_text(with_template("{{ trigger.x | b64encode }}", "broken"))
    port = free_port()
    serve = processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=daemon_env(redis_url))
    assert "template-unknown-filter" in processes.log_of(serve)

    async with aiohttp.ClientSession() as http:

        async def status(path: str) -> int:
            async with http.post(f"http://127.0.0.1:{port}/hooks/{path}", json={}) as response:
                return response.status

        assert await status("good") == 202
        assert await status("broken") == 404
        slowest = 0.0
        for name, (make, _) in HOSTILE.items():
            write(flows_dir / f"{name}.yaml", make())

        async def all_reported() -> bool:
            nonlocal slowest
            slowest = max(slowest, await healthz_latency(port, http))
            log = processes.log_of(serve)
            return all(f"{name}.yaml" in log and f"[{code}]" in log for name, (_, code) in HOSTILE.items())

        await wait_for(all_reported, timeout=20, interval=0.02)
        assert slowest < 0.2, f"/healthz took {slowest:.3f}s"
        assert serve.poll() is None
        assert await status("good") == 202
    assert "Traceback" not in processes.log_of(serve)


def test_serve_strict_refuses_to_start_with_a_broken_flow(redis_url, flows_dir):
    (flows_dir / "good.yaml").write_text(good("good"))
    (flows_dir / "broken.yaml").write_text("flow: !!python/name:os.system x\n")
    result = run_cli("serve", "--strict", "--flows", flows_dir, "--port", str(free_port()), env=daemon_env(redis_url))
    assert result.returncode == 1
    assert "broken.yaml:1:7: [yaml-tag]" in result.stderr
    assert "Traceback" not in result.stderr
