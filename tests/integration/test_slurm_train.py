"""The quickstart recipe trained on a real two-node Slurm cluster, preempted, requeued and resumed.

One job, submitted the way a user does (`encdec-launch RECIPE --slurm ...` as a subprocess): Ray across both
Slurm nodes with a training worker on each, checkpoints and metrics in the run directory; then USR1 to the batch
script as Slurm sends it before a time limit or on preemption (`scancel --batch --signal=USR1`): the run
checkpoints at the step it is on, the job requeues itself, the requeued job resumes from that checkpoint and
finishes at max_steps with every step trained exactly once.

The measured times (sbatch -> first training step; the preemption's steps) are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from slurm_testlib import ensure_local_slurm, job_field, job_logs, job_processes, wait_for

from encdec.launcher.backends import slurm

pytestmark = [pytest.mark.slurm, pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 30


@pytest.fixture(scope="module", autouse=True)
def _local_slurm() -> None:
    ensure_local_slurm()


def _steps(run_dir: Path) -> list[int]:
    """Training steps in rank 0's metrics.jsonl, in the order they were logged (a step whose checkpoint report
    repeats its metrics appears twice)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [int(r["step"]) for r in rows if "train/loss" in r]


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())


def _train_worker_nodes(job_id: str) -> set[str]:
    """Slurm nodes whose Ray node runs a training worker of this job (the worker inherits SLURMD_NODENAME)."""
    nodes = set()
    for pid in job_processes(job_id):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"RayTrainWorker" in cmd and b"SLURMD_NODENAME" in env:
            nodes.add(env[b"SLURMD_NODENAME"].decode())
    return nodes


@pytest.mark.timeout(1500)
def test_quickstart_on_two_slurm_nodes_preempted_requeued_resumed(tmp_path: Path) -> None:
    env = {**os.environ, "ENCDEC_RAY_OBJECT_STORE_MB": "300"}  # Ray's default is 30% of RAM per node
    cmd = [
        str(Path(sys.executable).with_name("encdec-launch")), str(REPO / "recipes" / "quickstart.yaml"),
        "--slurm", "--nodes", "2", "--set", "cluster.workers_per_node=1", "--storage", str(tmp_path / "runs"),
        "--set", f"train.max_steps={MAX_STEPS}", "--set", "train.log_every=1", "--set", "train.ckpt_every=10",
        "--set", f"train.val_every={MAX_STEPS}", "--set", f"data.train.tiles={tmp_path / 'data' / 'train'}",
        "--set", f"data.val.tiles={tmp_path / 'data' / 'val'}", "--signal-grace-s", "90", "--time", "30",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = slurm.read_record(run_dir)
    job_id, submitted = str(record["job_id"]), float(record["submitted_at"])
    assert f"submitted Slurm job {job_id}" in proc.stdout
    logs = lambda: job_logs(run_dir)  # noqa: E731

    # both Slurm nodes train, one Ray Train worker each
    wait_for("the first training step", lambda: _steps(run_dir), 900, debug=logs, interval=0.2)
    first_step_s = time.time() - submitted
    wait_for("a training worker on each Slurm node", lambda: _train_worker_nodes(job_id) == {"n1", "n2"}, 120,
             debug=lambda: f"{_train_worker_nodes(job_id)}\n{logs()}")
    assert slurm.status(run_dir).state == "RUNNING"

    # preemption: USR1 to the batch script only, as Slurm sends it signal_grace_s before the end
    wait_for("step 8", lambda: max(_steps(run_dir), default=0) >= 8, 600, debug=logs, interval=0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_for("the job to requeue itself", lambda: job_field(job_id, "Restarts") == "1", 300, debug=logs)
    before = _steps(run_dir)
    ckpt_step = max(_checkpoints(run_dir))
    assert before[-1] == ckpt_step < MAX_STEPS, f"stopped at step {before[-1]}, last checkpoint {ckpt_step}"

    wait_for("the requeued job to finish", lambda: job_field(job_id, "JobState") in {"COMPLETED", "FAILED"}, 900,
             debug=logs)
    status = slurm.status(run_dir)
    assert status.state == "COMPLETED" and status.restarts == 1, f"{status}\n{logs()}"

    first_run = list(dict.fromkeys(before))
    after = list(dict.fromkeys(_steps(run_dir)[len(before):]))
    resumed_step = after[0]
    assert first_run == list(range(1, ckpt_step + 1)), first_run
    assert after == list(range(ckpt_step + 1, MAX_STEPS + 1)), after   # nothing lost, nothing trained twice
    assert max(_checkpoints(run_dir)) == MAX_STEPS
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "metrics.png").is_file()
    text = slurm.logs(run_dir)
    assert re.search(r"USR1 \(preemption or time limit\): checkpointing, then requeue", text)
    assert "requeueing job" in text and f"job {job_id} restart 1 on n[1-2]" in text, text
    wait_for("the job's processes to end", lambda: not job_processes(job_id), 60)
    print(f"\nsbatch -> first training step: {first_step_s:.1f} s; preempted at step {before[-1]}, "
          f"checkpoint step {ckpt_step}, resumed at step {resumed_step}, final step {after[-1]}")
