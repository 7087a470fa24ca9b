"""A real three-node Redis Cluster on loopback ports, for the cluster tests.

``start_cluster`` starts three ``redis-server --cluster-enabled yes`` processes in a
directory of their own, joins them with ``redis-cli --cluster create`` (no replicas)
and waits until every node says ``cluster_state:ok``; ``Cluster.stop`` ends them.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NODES = 3


@dataclass
class Cluster:
    """The running nodes: their ports, processes and working directory."""

    ports: list[int]
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The store URL: one node's address (the client finds the others)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            _wait(proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Loopback ports free for a node and for its cluster bus (the port + 10000)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20_000, 55_000)
        if port not in ports and _free(port) and _free(port + 10_000):
            ports.append(port)
    return ports


def _ask(port: int, *command: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return done.stdout


def start_cluster(workdir: Path, deadline_seconds: float = 60.0) -> Cluster:
    """Start and join the nodes; raise ``RuntimeError`` when the cluster does not form."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            raise RuntimeError(f"no {binary} on the PATH: install redis-server (it brings both)")
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(free_ports(NODES), workdir)
    try:
        for port in cluster.ports:
            cluster.procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "5000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(workdir),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + deadline_seconds
        for port in cluster.ports:
            while _ask(port, "ping").strip() != "PONG":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start")
                time.sleep(0.05)
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in cluster.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=deadline_seconds,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        for port in cluster.ports:
            while True:
                info = _ask(port, "cluster", "info")
                if "cluster_state:ok" in info and f"cluster_known_nodes:{NODES}" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {port} never reached cluster_state:ok: {info}")
                time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster
