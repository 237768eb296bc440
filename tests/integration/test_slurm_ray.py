"""Ray on a real two-node Slurm cluster: the sbatch script's own mechanics, with a probe as the driver.

The probe (tests/cluster/ray_probe.py) joins the job's Ray cluster and runs a task pinned to each Ray node, so
these tests prove, in seconds rather than minutes of training: head + worker join across both Slurm nodes, the
token handling, cleanup of only this job's Ray, cancellation, and the USR1 -> checkpoint -> requeue -> resume
path and the graceful stop. tests/integration/test_slurm_train.py runs the real training the same way.

Needs the local Slurm cluster (`bash tests/cluster/local-slurm.sh up`, which CI runs first); the tests start it
themselves when they can, and skip saying why when they cannot.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from slurm_testlib import (
    bystander_ray,
    ensure_local_slurm,
    job_field,
    job_logs,
    job_processes,
    port_open,
    probe_driver,
    wait_for,
)

from encdec.launcher.backends import slurm

pytestmark = [pytest.mark.slurm, pytest.mark.ray, pytest.mark.slow]

# one Slurm CPU per node here; Ray gets 300 MB of object store per node (the default, 30% of RAM per node,
# would be counted once per simulated node on this one host)
FLAGS = {"cpus_per_task": 1, "ray_object_store_mb": 300, "dashboard": False, "signal_grace_s": 60}


@pytest.fixture(scope="module", autouse=True)
def _local_slurm() -> None:
    ensure_local_slurm()


def _recipe(tmp_path: Path) -> dict[str, Any]:
    return {"task": "segmentation", "run": {"name": "probe"},
            "cluster": {"nodes": 2, "storage": str(tmp_path), "slurm": {"time": None}}}


def _submit(tmp_path: Path, *probe_args: str) -> tuple[slurm.SlurmJob, Path]:
    run_dir = tmp_path / "run"
    out = run_dir / "probe.json"
    job = slurm.submit(_recipe(tmp_path), flags=FLAGS, run_dir=run_dir, driver=probe_driver(out, *probe_args))
    return job, out


def _events(out: Path) -> list[dict[str, Any]]:
    path = out.with_suffix(".events")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(600)
def test_two_nodes_join_token_stays_secret_and_cancel_cleans_only_this_job(tmp_path: Path) -> None:
    token_copy = tmp_path / "token-seen-by-driver"
    with bystander_ray(tmp_path / "bystander.log") as (bystander, bystander_port):
        t0 = time.monotonic()
        job, out = _submit(tmp_path, "--token-copy", str(token_copy), "--count-to", "600")
        run_dir = job.run_dir
        logs = lambda: job_logs(run_dir)  # noqa: E731
        wait_for("the probe's report", lambda: out.exists() and out.with_suffix(".count").exists(), 300, debug=logs)
        started_s = time.monotonic() - t0
        result = json.loads(out.read_text())
        assert result["ray_nodes"] == 2 and result["slurm_nodes"] == ["n1", "n2"], result
        assert result["auth_mode"] == "token" and result["token_env"] is False, result
        assert slurm.status(run_dir).state == "RUNNING"

        # cancel: the whole job goes, its Ray processes with it, and nothing else
        final = slurm.stop(run_dir, graceful=False)
        assert final.state == "CANCELLED", final
        wait_for("the job's processes to end", lambda: not job_processes(job.job_id), 60,
                 debug=lambda: f"left: {job_processes(job.job_id)}\n{logs()}")
        assert bystander.poll() is None and port_open(bystander_port), "the job's cleanup hit another Ray cluster"

    # the token: made per job, given to the driver as a 0600 file, never written to the script or any log
    token = token_copy.read_text().strip()
    assert len(token) == 64
    secrets = run_dir / "slurm" / ".secrets"
    for path in run_dir.rglob("*"):
        if path.is_file() and secrets not in path.parents:
            assert token not in path.read_text(errors="replace"), f"the Ray token leaked into {path}"
    assert secrets.stat().st_mode & 0o077 == 0
    wait_for("the cancelled job's cleanup to delete its token file", lambda: not list(secrets.iterdir()), 30)
    print(f"sbatch -> probe running on both nodes: {started_s:.1f} s")


@pytest.mark.timeout(900)
def test_preemption_requeues_and_resumes_then_graceful_stop(tmp_path: Path) -> None:
    job, out = _submit(tmp_path, "--count-to", "600")
    run_dir, count = job.run_dir, out.with_suffix(".count")
    logs = lambda: job_logs(run_dir)  # noqa: E731
    wait_for("the first run to count 2 steps", lambda: count.exists() and int(count.read_text() or 0) >= 2, 300,
             debug=logs)

    # what Slurm does signal_grace_s before a time limit or on preemption: USR1 to the batch shell only
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.job_id], check=True)
    wait_for("the requeued run", lambda: job_field(job.job_id, "Restarts") == "1"
             and len(_events(out)) == 1 and job_field(job.job_id, "JobState") == "RUNNING", 240, debug=logs)
    (first,) = _events(out)
    assert first["restart"] == 0 and first["stopped"] is True and first["from"] == 0, first
    stopped_at = first["to"]
    wait_for("the second run to count on", lambda: int(count.read_text() or 0) >= stopped_at + 2, 300, debug=logs)

    # the CLI on the run directory: status, then `stop` (the same USR1 path, but no requeue), then logs
    cli = [str(Path(sys.executable).with_name("encdec-launch"))]
    shown = subprocess.run([*cli, "status", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert f"Slurm job {job.job_id}: RUNNING on n[1-2]" in shown.stdout and "restarted 1x" in shown.stdout, shown
    stopped = subprocess.run([*cli, "stop", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert f"Slurm job {job.job_id}: COMPLETED" in stopped.stdout, f"{stopped.stdout}{stopped.stderr}\n{logs()}"
    final = slurm.status(run_dir)
    assert final.state == "COMPLETED" and final.restarts == 1, f"{final}\n{logs()}"
    first, second = _events(out)
    assert second["restart"] == 1 and second["from"] == stopped_at and second["stopped"] is True, second
    text = subprocess.run([*cli, "logs", str(run_dir)], capture_output=True, text=True, timeout=120).stdout
    assert "requeueing job" in text and "restart 1 on" in text and "no requeue" in text, text
    wait_for("the job's processes to end", lambda: not job_processes(job.job_id), 60)
    assert not Path(f"/tmp/ray-{job.job_id}").exists(), "the job's Ray temp dir was left behind"
    assert not list((run_dir / "slurm" / ".secrets").iterdir()), "the token file was left behind"
