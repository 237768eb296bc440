"""Ray Jobs: ``--submit`` sends a run to a cluster's Jobs API; ``status|logs|stop`` follow it.

The job's entrypoint is the launcher itself (``encdec-launch recipe.yaml --run-dir RUN_DIR --address auto``),
started on the head node by Ray's job supervisor. The resolved recipe travels in the job's ``runtime_env``
(its working directory), merged with the recipe's ``cluster.runtime_env`` (code via ``working_dir``/``pip``).
``stop`` sends SIGTERM, which the driver turns into "checkpoint and return"; the supervisor is told to wait
for that (``RAY_JOB_STOP_WAIT_TIME_S``) before it kills anything. Auth: the Jobs API needs the bearer token;
``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH`` make Ray's client send it (``encdec.launcher.ray.ray_auth``).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encdec.launcher.recipe.errors import LaunchError

__all__ = ["client_for", "dashboard_url_for", "follow_job", "submit_and_follow", "submit_job"]

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STOP_WAIT_S = 300


def dashboard_url_for(address: str | None) -> str:
    """The dashboard URL of ``address`` (a URL as is; ``auto``/``HOST:PORT`` resolved through the GCS)."""
    if address and address.startswith(("http://", "https://")):
        return address.rstrip("/")
    from encdec.launcher.ray.ray_auth import auth_env

    auth_env()
    import ray

    ctx = ray.init(address=address or "auto", logging_level=logging.ERROR, log_to_driver=False)
    try:
        url = ctx.dashboard_url
    finally:
        ray.shutdown()
    if not url:
        raise LaunchError(f"the Ray cluster at {address} runs without a dashboard; the Jobs API needs it "
                          "(start the head with --include-dashboard=true) or run without --submit")
    return url if url.startswith("http") else f"http://{url}"


def client_for(url: str) -> Any:
    """A JobSubmissionClient for the dashboard at ``url`` (token auth through the environment)."""
    from encdec.launcher.ray.ray_auth import auth_env

    auth_env()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as err:  # unreachable, wrong port, or 401
        raise LaunchError(f"cannot reach the Ray Jobs API at {url}: {err}. Check --address (the dashboard URL, "
                          "e.g. http://127.0.0.1:8265) and that this machine has the cluster's auth token "
                          "(RAY_AUTH_TOKEN_PATH)") from err


def submit_job(recipe: Any, run_dir: Path, url: str,
               argv: Callable[[str], list[str]] | None = None) -> str:
    """Submit the run as a Ray Job; returns the job (submission) id.

    ``argv(recipe_path)``: the command the job runs (default: train the recipe in ``run_dir``), given the recipe
    file as the job sees it.
    """
    from encdec.launcher.rundir import RECIPE_FILE, update_launch

    runtime_env = dict(recipe.cluster.runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(STOP_WAIT_S))
    runtime_env["env_vars"] = env_vars
    if "working_dir" not in runtime_env:
        job_dir = run_dir / "job"
        job_dir.mkdir(exist_ok=True)
        shutil.copy(run_dir / RECIPE_FILE, job_dir / RECIPE_FILE)
        runtime_env["working_dir"] = str(job_dir)
        recipe_arg = RECIPE_FILE
    else:
        recipe_arg = str(run_dir / RECIPE_FILE)  # the user's working_dir carries code; the recipe is on storage
    if argv is None:
        entrypoint = f"encdec-launch {recipe_arg} --run-dir {run_dir} --address auto --no-progress"
    else:
        entrypoint = shlex.join(argv(recipe_arg))
    client = client_for(url)
    submission_id = _free_submission_id(client, f"encdec-{run_dir.name}")
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                   metadata={"run_dir": str(run_dir)})
    except RuntimeError as err:  # the Jobs API answers errors as a server traceback: keep its last line
        lines = [ln.strip(" .") for ln in str(err).strip().splitlines() if ln.strip(" .")]
        raise LaunchError(f"the Ray Jobs API at {url} refused job {submission_id}: {lines[-1] if lines else err}. "
                          f"Fix: check the cluster (`ray status`, its dashboard) and submit again.") from None
    update_launch(run_dir, mode="ray-job", job_id=job_id, dashboard=url)
    return str(job_id)


def _free_submission_id(client: Any, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... when earlier jobs of the same folder (a rerun of predict into its
    output folder, a resumed run) hold it: Ray refuses a submission id it has seen."""
    try:
        taken = {j.submission_id for j in client.list_jobs()}
    except Exception:  # listing is a courtesy; the submission itself reports a real problem
        return base
    n, sid = 1, base
    while sid in taken:
        n += 1
        sid = f"{base}-{n}"
    return sid


def follow_job(client: Any, job_id: str, *, out: Any = sys.stdout, poll_s: float = 2.0) -> str:
    """Print the job's logs as they grow until it ends; returns the final status."""
    printed = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def submit_and_follow(recipe: Any, run_dir: Path, args: argparse.Namespace, console: Any,
                      argv: Callable[[str], list[str]] | None = None) -> int:
    """``--submit``: submit, print how to follow, and follow unless ``--no-follow``."""
    url = dashboard_url_for(args.address)
    job_id = submit_job(recipe, run_dir, url, argv)
    console.print(f"submitted Ray job {job_id} to {url}\n  follow: encdec-launch logs {run_dir} --follow"
                  f"\n  status: encdec-launch status {run_dir}\n  stop:   encdec-launch stop {run_dir}")
    if args.no_follow:
        return 0
    status = follow_job(client_for(url), job_id)
    console.print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
