"""The embedded local Ray cluster: ``ray start --block`` processes the launcher starts, owns and stops.

Each node is one ``ray start --block`` process in its own session (process group), so stopping the cluster
signals exactly those groups and never touches other Ray clusters on the machine (no ``ray stop``). Every node
gets its own free ports (GCS, dashboard, metrics, agents, worker range) and the cluster its own short
``--temp-dir`` (Unix socket paths must stay under ~107 characters), so several clusters coexist on one host.

The dashboard binds to 127.0.0.1 only. Token authentication is on (``encdec.launcher.ray.ray_auth``), and
``RAY_TRAIN_ENABLE_STATE_TRACKING=1`` is set on every node so that Ray Train V2 runs appear in the dashboard's
Train view (``/api/train/v2/runs/v1``; the older ``/api/train/v2/runs`` route serves Train V1 only and answers
500 for V2 runs).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encdec.launcher.ray.ray_auth import auth_env
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["LocalRayCluster", "ray_executable"]

STATE_TRACKING_ENV = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


def _free_ports(n: int, taken: set[int]) -> list[int]:
    from encdec.distributed.process_group import find_free_port  # torch: loaded only when a cluster starts

    out: list[int] = []
    while len(out) < n:
        p = find_free_port()
        if p not in taken and p not in out:
            out.append(p)
    taken.update(out)
    return out


def ray_executable() -> list[str]:
    """The ``ray`` CLI of this interpreter's environment (not whatever is first on PATH)."""
    exe = Path(sys.executable).parent / "ray"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class _Node:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path


@dataclass
class LocalRayCluster:
    """A Ray cluster of ``num_nodes`` nodes on this machine, started and stopped by the launcher.

    Args:
        temp_dir: Ray's root temp dir for this cluster (keep it short); a new ``/tmp/edray-XXXXXX`` by default.
        num_nodes: nodes to start (``--simulate-nodes``); node 0 is the head.
        num_cpus: logical CPUs per node (default: this machine's count).
        num_gpus: GPUs per node (default: Ray detects them on the head; 0 on simulated extra nodes).
        dashboard_port: the dashboard port (default: a free one; 8265 is often taken by another cluster).
        object_store_bytes: object store size per node (small by default: training data does not go through it).
    """

    temp_dir: str | None = None
    num_nodes: int = 1
    num_cpus: float | None = None
    num_gpus: int | None = None
    dashboard_port: int | None = None
    object_store_bytes: int = 256 * 1024**2
    host: str = "127.0.0.1"
    nodes: list[_Node] = field(default_factory=list)
    _taken: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._owns_temp = self.temp_dir is None  # a temp dir made here is removed by stop()
        if self.temp_dir is None:
            self.temp_dir = f"/tmp/edray-{secrets.token_hex(3)}"
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        self.env = self._env()

    # ------------------------------------------------------------------------------------------- properties
    @property
    def gcs_address(self) -> str:
        """``127.0.0.1:<port>``: what ``ray.init(address=...)`` and ``--address`` take."""
        return f"{self.host}:{self.nodes[0].ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        """``http://127.0.0.1:<port>``: the dashboard and the Jobs API."""
        return f"http://{self.host}:{self.nodes[0].ports['dashboard']}"

    @property
    def metrics_ports(self) -> list[int]:
        """Each node's Prometheus metrics export port (``/metrics``)."""
        return [n.ports["metrics"] for n in self.nodes]

    def info(self) -> dict[str, Any]:
        """Addresses of this cluster (no secrets), written to ``cluster.json`` for ``--keep-cluster``."""
        return {
            "gcs_address": self.gcs_address,
            "dashboard_url": self.dashboard_url,
            "metrics_ports": self.metrics_ports,
            "temp_dir": self.temp_dir,
            "pids": [n.proc.pid for n in self.nodes],
        }

    # ------------------------------------------------------------------------------------------- start/stop
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        auth_env(env)
        env.update(STATE_TRACKING_ENV)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray Jobs run `encdec-launch` on this cluster: find the same installation as the launcher that started it.
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        return env

    def _node_cmd(self, head: bool, ports: dict[str, int]) -> list[str]:
        # Each simulated node keeps its own temp dir: nodes sharing one would each tail every worker's log file
        # (duplicated driver output) and share socket names.
        temp = self.temp_dir if head else f"{self.temp_dir}/n{len(self.nodes)}"
        cmd = [
            *ray_executable(), "start", "--block", "--disable-usage-stats",
            f"--node-ip-address={self.host}",
            f"--temp-dir={temp}",
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--dashboard-agent-listen-port={ports['agent_http']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env']}",
            f"--min-worker-port={ports['worker_min']}",
            f"--max-worker-port={ports['worker_max']}",
            f"--object-store-memory={self.object_store_bytes}",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={int(self.num_cpus)}")
        if self.num_gpus is not None or not head:
            cmd.append(f"--num-gpus={int(self.num_gpus or 0) if head else 0}")
        if head:
            cmd += [
                "--head", f"--port={ports['gcs']}", "--include-dashboard=true",
                f"--dashboard-host={self.host}", f"--dashboard-port={ports['dashboard']}",
                f"--ray-client-server-port={ports['client']}",
            ]
        else:
            cmd.append(f"--address={self.gcs_address}")
        return cmd

    def _ports(self, head: bool) -> dict[str, int]:
        names = ["node_manager", "object_manager", "metrics", "agent_http", "agent_grpc", "runtime_env"]
        if head:
            names += ["gcs", "dashboard", "client"]
        ports = dict(zip(names, _free_ports(len(names), self._taken)))
        if head and self.dashboard_port:
            ports["dashboard"] = self.dashboard_port
        # Workers of different clusters must not fight over one port range: a random 200-port window below the
        # OS's ephemeral range (32768+ on Linux), where the free ports above were drawn.
        base = 10000 + 200 * secrets.randbelow(110)
        ports["worker_min"], ports["worker_max"] = base, base + 199
        return ports

    def _spawn(self, head: bool) -> _Node:
        ports = self._ports(head)
        log = Path(self.temp_dir) / f"launcher-node{len(self.nodes)}.log"  # type: ignore[arg-type]
        if head:
            # Ray processes that look the cluster up themselves (the Train state actor, the state API) would find
            # several clusters on a shared machine and fail: name this one.
            self.env["RAY_ADDRESS"] = f"{self.host}:{ports['gcs']}"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                self._node_cmd(head, ports), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,  # its own process group: stop() signals exactly this node's processes
            )
        node = _Node(proc, ports, log)
        self.nodes.append(node)
        return node

    def start(self, timeout: float = 180.0) -> LocalRayCluster:
        """Start the head, then the other nodes; return when all of them are up (or raise LaunchError)."""
        deadline = time.monotonic() + timeout
        head = self._spawn(head=True)
        self._wait(lambda: _port_open(self.host, head.ports["gcs"]), deadline, "the head node's GCS")
        for _ in range(self.num_nodes - 1):
            self._spawn(head=False)
        self._wait(lambda: self._alive_nodes() >= self.num_nodes, deadline, f"{self.num_nodes} nodes to join")
        self._wait(lambda: self._http_ok(self.dashboard_url + "/api/version"), deadline, "the dashboard")
        return self

    def _wait(self, ready: Any, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            for i, node in enumerate(self.nodes):
                if node.proc.poll() is not None:
                    tail = node.log.read_text(errors="replace")[-2000:]
                    self.stop()
                    raise LaunchError(f"local Ray node {i} exited with code {node.proc.returncode} while waiting for "
                                      f"{what}; its log ({node.log}) ends with:\n{tail}")
            try:
                if ready():
                    return
            except Exception:  # not up yet: connection refused, GCS not answering
                pass
            time.sleep(0.5)
        self.stop()
        raise LaunchError(f"timed out waiting for {what} of the local Ray cluster (temp dir {self.temp_dir}); "
                          "the machine may be overloaded: retry, or start Ray yourself and pass --address")

    def _alive_nodes(self) -> int:
        req = urllib.request.Request(self.dashboard_url + "/nodes?view=summary", headers=self.headers())
        with urllib.request.urlopen(req, timeout=5) as resp:
            data = json.loads(resp.read())
        summary = data.get("data", {}).get("summary", [])
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    def headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard API of this cluster (the bearer token; never print them)."""
        path = self.env.get("RAY_AUTH_TOKEN_PATH")
        if path and Path(path).is_file():
            return {"Authorization": f"Bearer {Path(path).read_text().strip()}"}
        return {}

    def _http_ok(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=self.headers()), timeout=5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace: float = 5.0) -> None:
        """Stop every node this object started: SIGTERM to each node's process group, SIGKILL after ``grace`` s.

        ``ray start --block`` shuts its children down one by one with long waits on SIGTERM (the GCS can
        outlive it by half a minute); the workers and raylet have had their SIGTERM by the time SIGKILL comes.
        """
        for node in reversed(self.nodes):
            _signal_group(node.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for node in reversed(self.nodes):
            _signal_group(node.proc, signal.SIGKILL)
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.nodes.clear()
        if self._owns_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # type: ignore[arg-type]

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this node's `ray start` leads (start_new_session=True)
    except (ProcessLookupError, PermissionError):
        pass
