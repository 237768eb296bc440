"""The Ray targets: the local cluster started for the run, an existing cluster (``--address``), a Ray Job (``--submit``).

The first two drive Ray from this process (the entry runs here); their run is followed through the driver's pid
and the run's ``metrics.jsonl``. A Ray Job runs the entry's command on the cluster; it is followed through the
Jobs API of the dashboard the launch recorded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from encdec.launcher.backends.base import Entry, Run
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["DEFAULT_DASHBOARD", "LocalRay", "RayCluster", "RayJob"]

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


def _tail(lines: list[str], tail: int | None) -> list[str]:
    return lines[-tail:] if tail else lines


def driver_alive(launch: dict[str, Any]) -> bool | None:
    """Whether the run's driver process lives (None: it runs on another host, or never recorded its pid)."""
    pid, host = launch.get("driver_pid"), launch.get("host")
    if not pid or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalRay:
    """A Ray cluster started on this machine for the run (``--simulate-nodes N`` nodes); the entry runs here."""

    mode = "local"
    runs_here = True
    strict_data = True
    writes_synthetic_here = True

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.args = args

    def where(self) -> str:
        n = (getattr(self.args, "simulate_nodes", None) or 1)
        return f"local Ray cluster ({n} node{'s' if n > 1 else ''})"

    def preview(self, entry: Entry, run_dir: Path) -> str | None:
        return None

    def submit(self, entry: Entry, make_run_dir: Callable[[], Path], console: Any) -> int:
        assert self.args is not None
        return entry.run_here(make_run_dir, self.args, console)

    def status(self, run: Run) -> str:
        state = {True: "running", False: "not running", None: "unknown (driver on another host)"}[
            driver_alive(run.launch)]
        return f"run {run.run_dir.name if run.run_dir else '?'}: driver {state}"

    def logs(self, run: Run, *, tail: int | None, follow: bool, out: IO[str], poll_s: float = 1.0) -> None:
        """The run's driver and worker log lines (``logs/``); ``follow``: until the driver exits."""
        from encdec.launcher.rundir import print_logs

        if run.run_dir is None:
            raise LaunchError("give a run directory")
        print_logs(run.run_dir, tail=tail, follow=follow, out=out, alive=lambda: driver_alive(run.launch), poll_s=poll_s)

    def stop(self, run: Run) -> str:
        alive = driver_alive(run.launch)
        if not alive:
            raise LaunchError("the run's driver is not running on this host; nothing to stop here"
                              if alive is False else "the run's driver runs on another host: stop it there")
        os.kill(int(run.launch["driver_pid"]), signal.SIGINT)
        return f"asked the driver (pid {run.launch['driver_pid']}) to checkpoint and stop"


class RayCluster(LocalRay):
    """An existing Ray cluster (``--address``): this process is its driver; followed like the local cluster."""

    mode = "ray-address"

    def where(self) -> str:
        return f"Ray cluster at {getattr(self.args, 'address', None)}"


class RayJob:
    """A Ray Job (``--submit`` to ``--address``): the entry's command runs on the cluster's head node."""

    mode = "ray-job"
    runs_here = False
    strict_data = False   # the cluster reads the data, not this machine
    writes_synthetic_here = True   # the submitter writes them to the storage the job reads

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.args = args

    def where(self) -> str:
        return "Ray Job"

    def preview(self, entry: Entry, run_dir: Path) -> str | None:
        return None

    def submit(self, entry: Entry, make_run_dir: Callable[[], Path], console: Any) -> int:
        from encdec.launcher.ray.jobs import submit_and_follow

        assert self.args is not None

        run_dir = make_run_dir()

        def argv(recipe_path: str) -> list[str]:
            return entry.argv(run_dir, recipe_path) + (["--address", "auto"] if entry.needs_ray_address else [])

        return submit_and_follow(entry.recipe, run_dir, self.args, console, argv)

    def _client(self, run: Run) -> tuple[Any, str]:
        from encdec.launcher.ray.jobs import client_for

        if "job_id" not in run.launch:
            raise LaunchError(f"{run.run_dir}: launch.json has no Ray job id (was the job submitted?)")
        return client_for(run.launch.get("dashboard") or run.address or DEFAULT_DASHBOARD), run.launch["job_id"]

    def status(self, run: Run) -> str:
        client, job_id = self._client(run)
        info = client.get_job_info(job_id)
        status = str(info.status).split(".")[-1]
        return f"job {job_id}: {status}" + (f" ({info.message})" if info.message else "")

    def logs(self, run: Run, *, tail: int | None, follow: bool, out: IO[str]) -> None:
        from encdec.launcher.ray.jobs import follow_job

        client, job_id = self._client(run)
        if follow:
            follow_job(client, job_id, out=out)
            return
        out.write("\n".join(_tail(client.get_job_logs(job_id).splitlines(), tail)) + "\n")

    def stop(self, run: Run) -> str:
        from encdec.launcher.ray.jobs import TERMINAL

        client, job_id = self._client(run)
        client.stop_job(job_id)
        for _ in range(600):
            status = str(client.get_job_status(job_id)).split(".")[-1]
            if status in TERMINAL:
                return f"job {job_id}: {status}"
            time.sleep(1)
        raise LaunchError(f"job {job_id} still stopping after 600 s; check `encdec-launch status` later")
