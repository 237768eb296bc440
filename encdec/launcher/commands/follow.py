"""``encdec-launch status|logs|stop RUN_DIR|JOB_ID``: one set of commands for every way a run was launched.

The run directory's ``launch.json`` says how (its ``mode``); the backend of that mode
(``encdec.launcher.backends``) answers. A bare job id (``encdec-...`` or ``raysubmit_...``) is a Ray Job looked
up on ``--address`` (the dashboard URL).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from encdec.launcher.backends.base import Run, backend_for_run
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["logs_command", "status_command", "stop_command"]

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


def _target(args: argparse.Namespace) -> Run:
    from encdec.launcher.rundir import is_run_dir, read_launch

    path = Path(args.target)
    if path.is_dir():
        if not is_run_dir(path):
            raise LaunchError(f"{path} is not a run directory (no recipe.yaml)")
        return Run(path.resolve(), read_launch(path), args.address)
    if os.sep in args.target:
        raise LaunchError(f"{args.target} does not exist")
    return Run(None, {"mode": "ray-job", "job_id": args.target, "dashboard": args.address or DEFAULT_DASHBOARD},
               args.address)


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


def status_command(args: argparse.Namespace) -> int:
    """Print the state of a run or job."""
    run = _target(args)
    print(backend_for_run(run).status(run))
    from encdec.launcher.rundir import describe_status

    recorded = describe_status(run.run_dir)  # status.json: the state the run recorded and why it ended
    if recorded:
        print(recorded)
    msg = _last_metrics(run.run_dir)
    if msg:
        print(msg)
    return 0


def logs_command(args: argparse.Namespace) -> int:
    """Print (or, with ``--follow``, stream until the run ends) the logs of a run or job."""
    run = _target(args)
    backend_for_run(run).logs(run, tail=args.tail, follow=args.follow, out=sys.stdout)
    return 0


def stop_command(args: argparse.Namespace) -> int:
    """Ask a run to checkpoint and stop (Slurm: USR1 then cancel; Ray Job: SIGTERM; local: SIGINT to the driver)."""
    run = _target(args)
    print(backend_for_run(run).stop(run))
    return 0
