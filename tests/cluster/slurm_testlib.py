"""Helpers for the tests that run jobs on the local Slurm cluster (tests/cluster/local-slurm.sh).

Imported by tests/integration/test_slurm*.py. Final job states come from ``scontrol show job`` (the local
cluster has no accounting; jobs stay known for MinJobAge = 3600 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LOCAL_SLURM = HERE / "local-slurm.sh"
PROBE = HERE / "ray_probe.py"


def slurm_answers() -> bool:
    """True when the Slurm client commands exist and slurmctld answers with two idle-or-busy nodes."""
    if not (shutil.which("sbatch") and shutil.which("scontrol")):
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    states = dict(line.split() for line in nodes.stdout.splitlines() if line.strip())
    return "UP" in ping.stdout and all(states.get(n, "").rstrip("*") in {"idle", "mix", "alloc"} for n in ("n1", "n2"))


def _skip(reason: str) -> None:
    # CI installs and starts Slurm itself (`make test`): there a missing cluster is a failure, not a skip.
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the Slurm tests: {reason}")
    pytest.skip(reason)


def ensure_local_slurm() -> None:
    """Start the local two-node cluster when it is not up; skip (saying why) when it cannot be started."""
    if slurm_answers():
        return
    if os.geteuid() != 0:
        _skip("local Slurm is not running and starting it needs root: run `bash tests/cluster/local-slurm.sh up`")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        _skip("local Slurm is not running and cannot be installed here (no apt-get, no slurmctld)")
    proc = subprocess.run(["bash", str(LOCAL_SLURM), "up"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not slurm_answers():
        _skip(f"local Slurm could not be started (`bash {LOCAL_SLURM} up` exit {proc.returncode}): "
                    f"{proc.stderr.strip()[-800:]}")


def job_field(job_id: str, name: str) -> str:
    """One field of ``scontrol show job -o`` (e.g. JobState, Restarts, ExitCode); '' when unknown."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return ""


def wait_for(what: str, check: Callable[[], object], timeout: float, *, debug: Callable[[], str] = lambda: "",
             interval: float = 0.5) -> object:
    """Poll ``check`` until it returns something truthy; fail with ``what`` and ``debug()`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{debug()}")
        time.sleep(interval)


def job_logs(run_dir: Path) -> str:
    """Every log of a run's Slurm job and the daemons' tails (what a failing test prints)."""
    parts = []
    for path in sorted((run_dir / "slurm").glob("*")):
        if path.is_file() and path.suffix in {".out", ".log"}:
            parts.append(f"==> {path.name} <==\n{path.read_text(errors='replace')[-4000:]}")
    daemons = subprocess.run(["bash", str(LOCAL_SLURM), "logs"], capture_output=True, text=True)
    return "\n".join(parts) + "\n" + daemons.stdout[-3000:]


def job_processes(job_id: str) -> list[int]:
    """Pids of live processes started by that job (they carry SLURM_JOB_ID in their environment)."""
    marker = f"SLURM_JOB_ID={job_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in env and state not in {"Z", "X"}:
            pids.append(int(proc.name))
    return pids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def bystander_ray(log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """An unrelated one-node Ray cluster on this host, which a job's cleanup must leave alone.

    Yields the ``ray start --block`` process and its GCS port; stops only that process group at the end.
    """
    ray = Path(sys.executable).with_name("ray")
    tmp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))   # short: Ray's socket paths must fit 107 bytes
    ports = [_free_port() for _ in range(9)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(ray), "start", "--head", "--block", f"--port={ports[0]}", f"--temp-dir={tmp}",
           "--include-dashboard=false", f"--ray-client-server-port={ports[1]}", f"--node-manager-port={ports[2]}",
           f"--object-manager-port={ports[3]}", f"--dashboard-agent-listen-port={ports[4]}",
           f"--dashboard-agent-grpc-port={ports[5]}", f"--runtime-env-agent-port={ports[6]}",
           f"--metrics-export-port={ports[7]}", "--num-cpus=0", "--object-store-memory=80000000",
           "--disable-usage-stats"]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("the bystander Ray's GCS port", lambda: port_open(ports[0]) or proc.poll() is not None, 120)
        if proc.poll() is not None:
            pytest.fail(f"bystander ray start exited {proc.returncode}: {log_path.read_text()}")
        yield proc, ports[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def probe_driver(out: Path, *extra: str) -> list[str]:
    """The probe as the job's driver (tests/cluster/ray_probe.py); the job appends ``--address``."""
    return [sys.executable, str(PROBE), "--out", str(out), *extra]
