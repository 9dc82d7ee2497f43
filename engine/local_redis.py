"""Local Redis topologies on one machine: a 3-master Cluster and a Sentinel group.

For tests, ``python -m bench --cluster`` and trying Cluster or Sentinel mode out
without a container engine. Each server is a plain ``redis-server`` process on a
free local port with its files in a folder of its own; :meth:`stop` ends them all.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis as sync_redis

from flowchat.redis_server import free_port, redis_binary


def redis_cli() -> str:
    """The ``redis-cli`` beside the ``redis-server`` in use (else the one on PATH)."""
    beside = Path(redis_binary()).resolve().parent / "redis-cli"
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if not found:
        raise RuntimeError("redis-cli is not installed (needed to create a local Cluster)")
    return found


class _Servers:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        home = self.folder / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(home / "log", "wb")  # the process keeps it open
        process = subprocess.Popen([redis_binary(), *args], cwd=home, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait(predicate: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (sync_redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _ping(port: int) -> bool:
    with sync_redis.Redis(port=port, socket_connect_timeout=0.5) as client:
        return bool(client.ping())


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; Cluster nodes need ports up to 55535."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if all(_free(candidate) for candidate in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for a Cluster node")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_COMMON = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no")


class LocalCluster(_Servers):
    """Three masters, no replicas: ``redis-server --cluster-enabled yes`` + ``redis-cli --cluster create``."""

    def __init__(self, folder: Path, masters: int = 3) -> None:
        super().__init__(folder)
        self.ports = [cluster_port() for _ in range(masters)]

    @property
    def url(self) -> str:
        """Any node will do: the client discovers the rest."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> LocalCluster:
        for port in self.ports:
            self.spawn(
                f"node-{port}",
                "--port", str(port), *_COMMON,
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
            )  # fmt: skip
        for port in self.ports:
            _wait(lambda port=port: _ping(port), f"cluster node {port}")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(  # bounded: redis-cli waits forever for a cluster bus it cannot reach
            [redis_cli(), "--cluster", "create", *nodes, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port in self.ports:
            _wait(lambda port=port: self._ok(port), f"cluster_state:ok on {port}")
        return self

    @staticmethod
    def _ok(port: int) -> bool:
        with sync_redis.Redis(port=port) as client:
            info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text


class LocalSentinel(_Servers):
    """A master, a replica and three sentinels watching them as ``master_name``."""

    def __init__(self, folder: Path, master_name: str = "flowchat") -> None:
        super().__init__(folder)
        self.master_name = master_name
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]

    @property
    def sentinels(self) -> str:
        """``FLOWCHAT_REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> LocalSentinel:
        master, replica = self.data_ports
        self.spawn(f"redis-{master}", "--port", str(master), *_COMMON)
        self.spawn(f"redis-{replica}", "--port", str(replica), *_COMMON, "--replicaof", "127.0.0.1", str(master))
        for port in self.data_ports:
            _wait(lambda port=port: _ping(port), f"redis {port}")
        _wait(lambda: self._replicas(master) >= 1, "the replica to attach")
        for port in self.sentinel_ports:
            home = self.folder / f"sentinel-{port}"
            home.mkdir(parents=True, exist_ok=True)
            config = home / "sentinel.conf"  # sentinels rewrite their config: one writable file each
            config.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} 1000\n"
                f"sentinel failover-timeout {self.master_name} 4000\n"
            )
            self.spawn(f"sentinel-{port}", str(config), "--sentinel")
        for port in self.sentinel_ports:
            _wait(lambda port=port: self._sees_replica(port), f"sentinel {port} to know the replica")
        return self

    @staticmethod
    def _replicas(port: int) -> int:
        with sync_redis.Redis(port=port) as client:
            return int(client.info("replication").get("connected_slaves", 0))

    def _sees_replica(self, port: int) -> bool:
        with sync_redis.Redis(port=port) as client:
            replicas = client.execute_command("SENTINEL", "REPLICAS", self.master_name)
            sentinels = client.execute_command("SENTINEL", "SENTINELS", self.master_name)
            return bool(replicas) and len(sentinels) >= 2

    def master_port(self) -> int:
        with sync_redis.Redis(port=self.sentinel_ports[0]) as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            return int(port)

    def failover(self, timeout: float = 30.0) -> int:
        """``SENTINEL FAILOVER``; returns the new master's port once it accepts writes."""
        old = self.master_port()
        with sync_redis.Redis(port=self.sentinel_ports[0]) as client:
            client.execute_command("SENTINEL", "FAILOVER", self.master_name)
        _wait(lambda: self.master_port() != old, "sentinels to name a new master", timeout)
        new = self.master_port()
        _wait(lambda: self._role(new) == "master", f"{new} to become master", timeout)
        return new

    @staticmethod
    def _role(port: int) -> str:
        with sync_redis.Redis(port=port) as client:
            return str(client.info("replication").get("role"))
