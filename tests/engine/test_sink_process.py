"""The sink as operators run it: inside `flowchat serve` and alone as `flowchat sink`, real processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import redis as sync_redis
from analytics_data import append, bulk, count, physical_rows
from support import ROOT, Processes, daemon_env, run_cli, wait_for, write_flow

from flowchat.daemon import SinkProcess
from flowchat.keys import Keys
from flowchat.redis_server import free_port
from flowchat.sink import GROUP

READER = """
import json, sys, time, duckdb
path, stop = sys.argv[1], sys.argv[2]
reads, errors, seen = 0, [], []
import os
while not os.path.exists(stop):
    try:
        con = duckdb.connect(path, read_only=True)
        seen.append(con.execute("SELECT count(*) FROM node_runs").fetchone()[0])
        con.close()
        reads += 1
    except Exception as exc:
        errors.append(repr(exc))
print(json.dumps({"reads": reads, "errors": errors[:5], "error_count": len(errors), "max": max(seen or [0])}))
"""


def test_serve_sinks_while_another_process_reads(processes: Processes, redis_url: str, tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    write_flow(flows, "noop", "  - {id: a, type: set, with: {values: {}}}\n")
    data = tmp_path / "data"
    env = daemon_env(redis_url, FLOWCHAT_DATA_DIR=str(data), FLOWCHAT_ANALYTICS_BATCH="1000")
    processes.start("serve", "--flows", str(flows), "--port", str(free_port()), env=env)
    views = data / "analytics.duckdb"
    _wait(lambda: views.exists())
    stop = tmp_path / "stop-reading"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(views), str(stop)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    for _ in range(20):
        append(redis_url, bulk(1000))
    _wait(lambda: count(data, "SELECT count(*) FROM node_runs") == 20_000, timeout=60)
    stop.touch()
    out, _ = reader.communicate(timeout=30)
    result = json.loads(out)
    assert result["error_count"] == 0, result["errors"]
    assert result["reads"] > 5 and result["max"] > 0
    # idle: one more event is visible within 5 s
    started = time.monotonic()
    append(redis_url, bulk(1))
    _wait(lambda: count(data, "SELECT count(*) FROM node_runs") == 20_001, timeout=5)
    assert time.monotonic() - started < 5


def test_sigkill_of_the_sink_mid_stream_leaves_every_event_once(
    processes: Processes, redis_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = daemon_env(
        redis_url, FLOWCHAT_DATA_DIR=str(data), FLOWCHAT_ANALYTICS_BATCH="2000", FLOWCHAT_ANALYTICS_LEASE="1"
    )
    total = 40_000
    events = bulk(total)
    sink = processes.start("sink", env=env)
    writer = threading.Thread(target=lambda: [append(redis_url, events[i : i + 500]) for i in range(0, total, 500)])
    writer.start()
    client = sync_redis.Redis.from_url(redis_url)
    _wait(lambda: physical_rows(data) >= 4000, timeout=60)
    _wait(lambda: int(client.xpending(Keys().events, GROUP)["pending"]) > 0)  # a batch in hand
    sink.send_signal(signal.SIGKILL)
    sink.wait()
    unacked = int(client.xpending(Keys().events, GROUP)["pending"])
    assert unacked > 0  # killed mid-batch: read, perhaps written, not acknowledged
    writer.join()
    processes.start("sink", env=env)
    _wait(lambda: count(data, "SELECT count(*) FROM node_runs") == total, timeout=60)
    assert count(data, "SELECT count(DISTINCT event_id) FROM node_runs") == total
    _wait(lambda: int(client.xpending(Keys().events, GROUP)["pending"]) == 0)
    time.sleep(0.5)
    assert count(data, "SELECT count(*) FROM node_runs") == total
    client.close()


def _wait(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        time.sleep(0.05)


SHOP_FLOW = """flow: shop
trigger: {type: webhook, path: shop}
nodes:
  - {id: tag, type: contact.tag, with: {phone: "{{ trigger.phone }}", add: ["{{ trigger.campaign }}"]}}
  - id: order
    type: metric
    with: {name: order_value, value: "{{ trigger.value }}", tags: {campaign: "{{ trigger.campaign }}"}}
  - {id: check, type: validate, with: {schema: {type: object, required: [paid]}}}
"""


def test_real_executions_reach_the_views(processes: Processes, redis_url: str, tmp_path: Path) -> None:
    """Webhooks and an inbound WhatsApp message through `flowchat serve`; the views and the report show them."""
    import urllib.request

    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "shop.yaml").write_text(SHOP_FLOW)
    (flows / "whatsapp_welcome.yaml").write_text((ROOT / "flows" / "whatsapp_welcome.yaml").read_text())
    data = tmp_path / "data"
    env = daemon_env(redis_url, FLOWCHAT_DATA_DIR=str(data), FLOWCHAT_ANALYTICS_FLUSH="0.2")
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_WHATSAPP_NUMBER"):
        env.pop(name, None)  # outbox mode: sends are recorded as simulated
    port = free_port()
    processes.start("serve", "--flows", str(flows), "--port", str(port), env=env)
    orders = [("+14155550111", "spring", 10, True), ("+14155550112", "spring", 5, False), ("+14155550113", "fall", 7, True)]
    for phone, campaign, value, paid in orders:
        body = {"phone": phone, "campaign": campaign, "value": value, **({"paid": True} if paid else {})}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/hooks/shop", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
    simulate = ["simulate", "message", "--from", "+14155550199", "--body", "hi", "--url", f"http://127.0.0.1:{port}"]
    sent = run_cli(*simulate, env=env)
    assert sent.returncode == 0, sent.stderr
    _wait(lambda: count(data, "SELECT count(*) FROM executions") == 4, timeout=30)
    _wait(lambda: count(data, "SELECT count(*) FROM messages WHERE direction = 'outbound'") == 1, timeout=30)
    con = duckdb.connect(str(data / "analytics.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT flow, status, error_code, trigger_type, duration_ms >= 0 FROM executions ORDER BY flow, status"
        ).fetchall()
        assert rows == [
            ("shop", "failed", "validation-failed", "webhook", True),
            ("shop", "succeeded", None, "webhook", True),
            ("shop", "succeeded", None, "webhook", True),
            ("whatsapp_welcome", "succeeded", None, "twilio.message", True),
        ]
        assert con.execute(
            "SELECT node, node_type, status FROM node_runs WHERE status = 'failed'"
        ).fetchall() == [("check", "validate", "failed")]
        assert con.execute("SELECT count(*) FROM node_runs WHERE duration_ms IS NULL OR started_at IS NULL").fetchone() == (0,)
        sums = con.execute("SELECT tags['campaign'], sum(value) FROM metrics GROUP BY 1 ORDER BY 1").fetchall()
        assert sums == [("fall", 7.0), ("spring", 15.0)]
        tagged = con.execute(
            "SELECT phone, tags FROM contact_events WHERE action = 'tagged' ORDER BY phone"
        ).fetchall()
        assert [p for p, _ in tagged] == [p for p, *_ in orders] and tagged[0][1] == ["spring"]
        message = con.execute(
            "SELECT flow, node, phone, status, simulated_at IS NOT NULL FROM messages WHERE direction = 'outbound'"
        ).fetchone()
        assert message == ("whatsapp_welcome", "reply", "+14155550199", "simulated", True)
    finally:
        con.close()
    report = run_cli("analytics", "report", "--json", env=env)
    flows_report = {row["flow"]: row for row in json.loads(report.stdout)["flows"]}
    assert flows_report["shop"]["executions"] == 3 and flows_report["shop"]["success_rate"] == 0.6667
    # erasure through the contacts CLI: the phone leaves every view at once
    erase = ["contacts", "erase", "+14155550111"]
    erased = run_cli(*erase, env=env)
    assert erased.returncode == 0, erased.stderr
    _wait(lambda: count(data, "SELECT count(*) FROM contact_events WHERE phone = '+14155550111'") == 0, timeout=5)
    # left: the other two contacts (created, tagged) and the one who wrote in (created)
    assert count(data, "SELECT count(*) FROM contact_events") == 5


def _sink_children(parent: int) -> list[int]:
    """Pids of `flowchat sink --parent-pid <parent>` processes (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sink" in argv and b"--parent-pid" in argv and argv[argv.index(b"--parent-pid") + 1] == str(parent).encode():
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().split(") ", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_runs_its_sink_as_a_child_restarts_it_and_never_leaves_it_behind(
    processes: Processes, redis_url: str, tmp_path: Path
) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    write_flow(flows, "noop", "  - {id: a, type: set, with: {values: {}}}\n")
    env = daemon_env(redis_url, FLOWCHAT_DATA_DIR=str(tmp_path / "data"), FLOWCHAT_ANALYTICS_LEASE="1")
    serve = processes.start("serve", "--flows", str(flows), "--port", str(free_port()), env=env)
    _wait(lambda: len(_sink_children(serve.pid)) == 1)
    [first] = _sink_children(serve.pid)
    append(redis_url, bulk(10))
    _wait(lambda: count(tmp_path / "data", "SELECT count(*) FROM node_runs") == 10)

    os.kill(first, signal.SIGKILL)  # a crashed sink is started again, and takes up where it was
    _wait(lambda: [pid for pid in _sink_children(serve.pid) if pid != first and _alive(pid)] != [])
    append(redis_url, bulk(10))
    _wait(lambda: count(tmp_path / "data", "SELECT count(*) FROM node_runs") == 20, timeout=30)
    assert "the analytics sink exited" in processes.log_of(serve)

    [second] = [pid for pid in _sink_children(serve.pid) if _alive(pid)]
    serve.send_signal(signal.SIGKILL)  # serve killed without a chance to stop its sink: the sink stops itself
    serve.wait()
    _wait(lambda: not _alive(second), timeout=10)


def test_serve_stops_its_sink_when_it_stops(processes: Processes, redis_url: str, tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    write_flow(flows, "noop", "  - {id: a, type: set, with: {values: {}}}\n")
    env = daemon_env(redis_url, FLOWCHAT_DATA_DIR=str(tmp_path / "data"))
    serve = processes.start("serve", "--flows", str(flows), "--port", str(free_port()), env=env)
    _wait(lambda: len(_sink_children(serve.pid)) == 1)
    [child] = _sink_children(serve.pid)
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=30) == 0
    assert not _alive(child)


class _Sleeper(SinkProcess):
    """A child that would run for a minute unless stopped."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]


async def test_a_stop_while_the_sink_starts_stops_the_child_being_started() -> None:
    sink = _Sleeper()
    running = asyncio.create_task(sink.run())
    await asyncio.sleep(0)  # run() is inside create_subprocess_exec: forked, not yet handed back
    await sink.stop(grace=1)  # SIGTERM to serve during its start-up
    try:
        await asyncio.wait_for(running, 10)  # serve waits for its sink before exiting
    finally:
        if sink.process is not None and sink.process.returncode is None:
            sink.process.kill()
    assert sink.process is not None and sink.process.returncode == -signal.SIGTERM


async def test_a_sink_that_cannot_start_is_retried_with_a_capped_backoff(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    class Missing(SinkProcess):
        def command(self) -> list[str]:
            return [str(tmp_path / "no-such-python")]  # as EAGAIN or EMFILE would: the spawn raises OSError

    caplog.set_level(logging.WARNING, "flowchat.daemon")
    sink = Missing(restart_after=0.01, ceiling=0.04)
    running = asyncio.create_task(sink.run())
    await wait_for(lambda: len(caplog.records) >= 4 or running.done())
    assert not running.done()  # the task ending would stop serve (a part that died)
    await sink.stop(grace=1)
    await asyncio.wait_for(running, 5)
    assert all("could not start (FileNotFoundError" in record.getMessage() for record in caplog.records)
    assert [record.args[1] for record in caplog.records[:4]] == [0.02, 0.04, 0.04, 0.04]  # type: ignore[index]


def test_serve_on_its_embedded_redis_shares_it_with_its_sink(processes: Processes, tmp_path: Path) -> None:
    """No FLOWCHAT_REDIS_URL: the child reads serve's embedded server (not an empty one of its own), logs as
    serve does, and when serve is killed it stops itself and, the last user out, the server too."""
    flows = tmp_path / "flows"
    flows.mkdir()
    write_flow(flows, "noop", "  - {id: a, type: set, with: {values: {}}}\n")
    data = tmp_path / "data"
    env = daemon_env("", FLOWCHAT_DATA_DIR=str(data))
    del env["FLOWCHAT_REDIS_URL"]
    serve = processes.start("--log-format", "json", "serve", "--flows", str(flows), "--port", str(free_port()), env=env)
    _wait(lambda: len(_sink_children(serve.pid)) == 1)
    [child] = _sink_children(serve.pid)
    argv = (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--log-format") + 1] == b"json"
    embedded = f"unix://{data / 'redis.sock'}?db=0"
    append(embedded, bulk(10))
    _wait(lambda: count(data, "SELECT count(*) FROM node_runs") == 10, timeout=30)

    serve.send_signal(signal.SIGKILL)
    serve.wait()
    _wait(lambda: not _alive(child), timeout=10)
    _wait(lambda: not (data / "redis.sock").exists() or not _answers(data / "redis.sock"), timeout=10)


def _answers(path: Path) -> bool:
    try:
        return bool(sync_redis.Redis(unix_socket_path=str(path), socket_connect_timeout=0.5).ping())
    except sync_redis.RedisError:
        return False
