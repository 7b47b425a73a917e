"""A Ray cluster on this machine's loopback: `ray start --block` processes, stopped by their process ids.

For the tests (tests/distributed) and benchmarks/bench_ray.py, and to try ``--ray`` without a cluster::

    cluster = LocalCluster()
    cluster.start_head(); cluster.add_worker("worker")   # one CPU each, token authentication on
    ...  # RAY_AUTH_MODE=token RAY_AUTH_TOKEN=cluster.token quantlab convert ... --ray cluster.address
    cluster.stop()

Each node is one `ray start --block` process in its own session and temp folder; stopping it is a SIGTERM
to that process (it stops what it started), then a SIGKILL to its session's process group.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One `ray start --block` process (head or worker) with its own temp folder and log."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]):
        # a short folder: Ray's unix sockets live under it (108-byte path limit)
        self.temp = Path(tempfile.mkdtemp(prefix=f"qlray-{name}-", dir="/tmp"))
        self.log = self.temp / "start.log"
        cmd = [
            str(RAY),
            "start",
            "--block",
            "--num-cpus",
            "1",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(self.temp),
            "--node-name",
            name,
            "--disable-usage-stats",
            *args,
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.name = name

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"Ray runtime started" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start {self.name} failed:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to the `ray start --block` process (it stops the processes it started), then SIGKILL to
        its process group (its own session: only what it started) if anything is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)


class LocalCluster:
    """A head and workers on 127.0.0.1, one CPU each, token authentication on."""

    def __init__(self, **env: str):
        """env: set in every node's processes (Ray reads its RAY_* settings from there)."""
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[Node] = []

    def start_head(self) -> Node:
        head = Node("head", ["--head", "--port", str(self.port), "--include-dashboard", "false"], self.env)
        self.nodes.append(head)
        head.wait_started()
        return head

    def add_worker(self, name: str, **env: str) -> Node:
        node = Node(name, ["--address", self.address], {**self.env, **env})
        self.nodes.append(node)
        node.wait_started()
        return node

    @property
    def token(self) -> str:
        return self.env["RAY_AUTH_TOKEN"]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes = []
