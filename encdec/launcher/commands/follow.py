"""``encdec-launch status|logs|stop RUN_DIR|JOB_ID``: one set of commands for every way a run was launched.

The run directory's ``launch.json`` says how (``local``/``ray-address``: a driver process on some host;
``ray-job``: a Ray Job id and its dashboard; ``slurm``: a Slurm job, handled by ``encdec.launcher.backends.slurm``).
A bare job id (``encdec-...`` or ``raysubmit_...``) is looked up on ``--address`` (the dashboard URL).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from encdec.launcher.recipe.errors import LaunchError

__all__ = ["logs_command", "status_command", "stop_command"]

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


def _target(args: argparse.Namespace) -> tuple[Path | None, dict[str, Any]]:
    from encdec.launcher.rundir import is_run_dir, read_launch

    path = Path(args.target)
    if path.is_dir():
        if not is_run_dir(path):
            raise LaunchError(f"{path} is not a run directory (no recipe.yaml)")
        return path.resolve(), read_launch(path)
    if os.sep in args.target:
        raise LaunchError(f"{args.target} does not exist")
    return None, {"mode": "ray-job", "job_id": args.target, "dashboard": args.address or DEFAULT_DASHBOARD}


def _is_slurm(run_dir: Path | None, launch: dict[str, Any]) -> bool:
    if run_dir is None:
        return False
    if launch.get("mode") == "slurm":
        return True
    from encdec.launcher.backends import slurm

    return bool(slurm.is_slurm_run(run_dir))


def _last_metrics(run_dir: Path | None) -> str:
    if run_dir is None:
        return ""
    from encdec.launcher.report import metric_rows

    rows = metric_rows(run_dir / "metrics.jsonl")
    if not rows:
        return "no metrics yet"
    last = rows[-1]
    keys = ("step", "train/loss", "val/mIoU", "train/tiles_per_s")
    return "last report: " + ", ".join(f"{k}={last[k]:.4g}" if isinstance(last[k], float) else f"{k}={last[k]}"
                                       for k in keys if k in last)


def _driver_alive(launch: dict[str, Any]) -> bool | None:
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


def status_command(args: argparse.Namespace) -> int:
    """Print the state of a run or job."""
    run_dir, launch = _target(args)
    if _is_slurm(run_dir, launch):
        from encdec.launcher.backends import slurm

        print(slurm.status(run_dir))  # type: ignore[arg-type]
        print(_last_metrics(run_dir))
        return 0
    if launch.get("mode") == "ray-job":
        from encdec.launcher.ray.jobs import client_for

        client = client_for(launch.get("dashboard") or args.address or DEFAULT_DASHBOARD)
        info = client.get_job_info(launch["job_id"])
        status = str(info.status).split(".")[-1]
        print(f"job {launch['job_id']}: {status}" + (f" ({info.message})" if info.message else ""))
    else:
        alive = _driver_alive(launch)
        state = {True: "running", False: "not running", None: "unknown (driver on another host)"}[alive]
        print(f"run {run_dir.name if run_dir else '?'}: driver {state}")
    msg = _last_metrics(run_dir)
    if msg:
        print(msg)
    return 0


def logs_command(args: argparse.Namespace) -> int:
    """Print (or follow) the logs of a run or job."""
    run_dir, launch = _target(args)
    if _is_slurm(run_dir, launch):
        from encdec.launcher.backends import slurm

        print(slurm.logs(run_dir, tail=args.tail))  # type: ignore[arg-type]
        return 0
    if launch.get("mode") == "ray-job":
        from encdec.launcher.ray.jobs import client_for, follow_job

        client = client_for(launch.get("dashboard") or args.address or DEFAULT_DASHBOARD)
        if args.follow:
            follow_job(client, launch["job_id"])
            return 0
        text = client.get_job_logs(launch["job_id"])
        lines = text.splitlines()
        print("\n".join(lines[-args.tail:] if args.tail else lines))
        return 0
    if run_dir is None:
        raise LaunchError("give a run directory")
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    print("\n".join(lines[-args.tail:] if args.tail else lines))
    return 0


def stop_command(args: argparse.Namespace) -> int:
    """Ask a run to checkpoint and stop (Slurm: USR1 then cancel; Ray Job: SIGTERM; local: SIGINT to the driver)."""
    run_dir, launch = _target(args)
    if _is_slurm(run_dir, launch):
        from encdec.launcher.backends import slurm

        print(slurm.stop(run_dir))  # type: ignore[arg-type]
        return 0
    if launch.get("mode") == "ray-job":
        from encdec.launcher.ray.jobs import TERMINAL, client_for

        client = client_for(launch.get("dashboard") or args.address or DEFAULT_DASHBOARD)
        client.stop_job(launch["job_id"])
        for _ in range(600):
            status = str(client.get_job_status(launch["job_id"])).split(".")[-1]
            if status in TERMINAL:
                print(f"job {launch['job_id']}: {status}")
                return 0
            time.sleep(1)
        print(f"job {launch['job_id']} still stopping", file=sys.stderr)
        return 1
    alive = _driver_alive(launch)
    if not alive:
        raise LaunchError("the run's driver is not running on this host; nothing to stop here"
                          if alive is False else "the run's driver runs on another host: stop it there")
    os.kill(int(launch["driver_pid"]), signal.SIGINT)
    print(f"asked the driver (pid {launch['driver_pid']}) to checkpoint and stop")
    return 0
