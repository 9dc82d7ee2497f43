"""The embedded redis-server: one per data directory, shared by every FlowChat process using it, files private."""

from __future__ import annotations

import stat
import time
from pathlib import Path

from redis import Redis

from flowchat.redis_server import RedisServer


def test_processes_on_one_data_dir_share_one_server_and_the_last_one_out_stops_it(tmp_path):
    first = RedisServer(tmp_path).start()
    second = RedisServer(tmp_path).start()

    assert first.process is not None and second.process is None  # the second shared the first's server
    first.stop()
    assert first.process.poll() is None  # still in use by the second
    assert second._state() == "ready"

    second.stop()
    first.process.wait(timeout=10)
    assert second._state() is None


def test_a_server_whose_owner_left_is_stopped_by_the_last_user(tmp_path):
    owner = RedisServer(tmp_path).start()
    user = RedisServer(tmp_path).start()
    owner.stop()

    user.stop()

    assert owner.process is not None and owner.process.wait(timeout=10) == 0


def test_a_system_redis_server_is_preferred_to_the_older_copy_the_wheel_puts_in_the_venv(monkeypatch):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from flowchat.redis_server import redis_binary

    system = next(
        (found for folder in ("/usr/bin", "/usr/local/bin") if (found := shutil.which("redis-server", path=folder))),
        None,
    )
    venv_copy = Path(sys.executable).parent / "redis-server"
    if system is None or not venv_copy.exists():
        return  # nothing to choose between on this machine
    monkeypatch.setenv("PATH", f"{venv_copy.parent}:{Path(system).parent}")

    chosen = redis_binary()

    assert chosen == system
    assert "v=6.2" not in subprocess.run([chosen, "--version"], capture_output=True, text=True).stdout


def test_the_embedded_redis_keeps_its_files_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "old.aof").write_text("written before the rule")
    (data / "old.aof").chmod(0o644)
    server = RedisServer(data).start()
    try:
        client = Redis.from_url(server.url)
        client.set("trigger", "+14155554567")
        client.execute_command("BGREWRITEAOF")
        time.sleep(0.3)
        client.close()
    finally:
        server.stop(force=True)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [path for path in data.rglob("*") if path.is_file() and not path.is_socket()]
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
