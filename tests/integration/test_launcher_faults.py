"""Fault tolerance and stopping, for real: a worker killed by PID on a 2-node cluster, Ctrl-C, ``--resume`` (of a
run tracked with MLflow and TensorBoard: both read back after the resume)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launcher_testlib import launch, popen, quick_args, run_dirs

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _complete_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "meta.json").is_file()) \
        if root.is_dir() else []


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [int(json.loads(line)["step"]) for line in path.read_text().splitlines() if line.strip()]


def _wait(cond, timeout: float, proc: subprocess.Popen[bytes], what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        assert proc.poll() is None, f"the run exited ({proc.returncode}) while waiting for {what}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_killed_on_two_nodes_restores(ray_cluster: object, quick_tiles: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    args = quick_args(quick_tiles, storage, "--address", ray_cluster.gcs_address,  # type: ignore[attr-defined]
                      "--nodes", "2", "--workers-per-node", "1",
                      "--set", "train.max_steps=24", "--set", "train.ckpt_every=6", "--set", "train.log_every=3",
                      "--set", "train.val_every=24", "--set", "run.export=false")
    log = tmp_path / "run.log"
    proc = popen(args, log)
    try:
        _wait(lambda: storage.is_dir() and bool(run_dirs(storage)), 300, proc, "the run directory")
        run_dir = run_dirs(storage)[0]
        _wait(lambda: bool(_complete_steps(run_dir)), 600, proc, "the first checkpoint")
        workers = {r: json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)}
        assert workers[0]["node_id"] != workers[1]["node_id"], "STRICT_SPREAD must put one worker on each node"
        committed = max(_complete_steps(run_dir))
        killed_at = time.time()
        os.kill(workers[1]["pid"], signal.SIGKILL)
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    restarted = json.loads((run_dir / "workers" / "rank1.json").read_text())
    assert restarted["pid"] != workers[1]["pid"] and restarted["started"] > killed_at
    assert restarted["final_step"] == 24
    # the restarted group resumed from a checkpoint at least as new as the last one committed before the kill
    resumed = [int(m.group(2)) for m in re.finditer(r"resumed from \S*step_(\d+) at step (\d+)", text)]
    assert resumed and min(resumed) >= committed, (committed, resumed)
    steps = _logged_steps(run_dir)
    assert steps[-1] == 24 and set(range(3, 25, 3)) <= set(steps)
    assert 24 in _complete_steps(run_dir)


SECRET = "pw-must-not-leak-7f3a9c"


def _files_with(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _report_steps(run_dir: Path, key: str) -> list[int]:
    """The steps of metrics.jsonl's rows that carry ``key``, each once: what the tracker sends for it."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted({int(r["step"]) for r in rows if key in r})


def test_ctrl_c_checkpoints_then_resume_finishes(ray_cluster: object, quick_tiles: Path, tmp_path: Path) -> None:
    """Embedded local cluster of 2 simulated nodes (no --address): `stop` sends SIGINT (Ctrl-C) to the driver ->
    checkpoint -> clean exit, the cluster's processes gone; then --resume on another cluster finishes the run.
    The run is tracked (MLflow, TensorBoard): after the resume both hold one run with every step once, and no
    credential from the environment was written anywhere. (One run for both: each launch costs 30-60 s.)"""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    storage = tmp_path / "runs"
    temp = f"/tmp/ray-s{os.getpid()}"
    env = {"MLFLOW_TRACKING_PASSWORD": SECRET, "MLFLOW_TRACKING_USERNAME": "alice"}
    args = quick_args(quick_tiles, storage, "--ray-temp-dir", temp, "--simulate-nodes", "2", "--workers-per-node", "1",
                      "--set", "train.max_steps=16",
                      "--set", "train.ckpt_every=100", "--set", "train.log_every=2", "--set", "train.val_every=100",
                      "--set", "run.export=false", "--set", "track.tensorboard=true",
                      "--set", "track.mlflow.experiment=itest", "--set", "track.mlflow.tags={team: eo}")
    log = tmp_path / "run.log"
    proc = popen(args, log, env=env)
    try:
        _wait(lambda: storage.is_dir() and bool(run_dirs(storage)), 300, proc, "the run directory")
        run_dir = run_dirs(storage)[0]
        _wait(lambda: any(s >= 4 for s in _logged_steps(run_dir)), 900, proc, "step 4")
        status = launch(["status", str(run_dir)], timeout=60)
        assert "driver running" in status.stdout, status.stdout + status.stderr
        stop = launch(["stop", str(run_dir)], timeout=60)  # SIGINT to the driver, as Ctrl-C in its terminal
        assert stop.returncode == 0 and "checkpoint and stop" in stop.stdout, stop.stdout + stop.stderr
        assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "stop requested" in text and "continue with: encdec-launch --resume" in text
    nodes = {json.loads(p.read_text())["node_id"] for p in (run_dir / "workers").glob("rank*.json")}
    assert len(nodes) == 2  # --simulate-nodes 2: one worker on each simulated node
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    stopped_at = int(last["step"])
    assert last.get("stopped") is True and 4 <= stopped_at < 16
    assert _complete_steps(run_dir) == [stopped_at]  # ckpt_every=100: this one came from Ctrl-C
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    # loadable: restore it into a model in this process
    from encdec.launcher.commands.export_cmd import restore
    from encdec.launcher.recipe.validate import load_recipe

    module = restore(run_dir, load_recipe(run_dir / "recipe.yaml"), run_dir / "checkpoints" / f"step_{stopped_at:08d}")
    assert sum(p.numel() for p in module.parameters()) > 0
    # the embedded cluster was stopped: no process of it is left
    left = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True, check=False).stdout.split()
    assert left == [], f"processes of the embedded cluster left: {left}"
    shutil.rmtree(temp, ignore_errors=True)

    # --resume continues the same run directory on another cluster and finishes it (exporting: run.export on now)
    done = launch(["--resume", str(run_dir), "--address", ray_cluster.gcs_address,  # type: ignore[attr-defined]
                   "--no-progress", "--set", "run.export=true"], timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert run_dirs(storage) == [run_dir]  # no new run directory
    assert "tracking" in done.stdout and "problem" not in done.stdout
    steps = _logged_steps(run_dir)
    last_stop = len(steps) - 1 - steps[::-1].index(stopped_at)
    after = steps[last_stop + 1:]
    assert after and after[0] == stopped_at + 2 - stopped_at % 2 and after[-1] == 16, (stopped_at, steps)
    assert 16 in _complete_steps(run_dir)

    # MLflow: the same run continued (not a second one), finished, every step of both launches sent once. The
    # stop's report (at the stop step, with the last logged values) is a report like any other.
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    (only,) = client.search_runs([client.get_experiment_by_name("itest").experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    assert only.data.tags["team"] == "eo" and only.data.tags["encdec.status"] == "finished"
    assert only.data.params["optim.lr"] == "0.001" and only.data.params["train.strategy"] == "ddp"
    loss_steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(loss_steps) == _report_steps(run_dir, "train/loss")  # each step once
    assert set(range(2, 17, 2)) <= set(loss_steps) and stopped_at in loss_steps  # both launches
    val_steps = sorted(m.step for m in client.get_metric_history(run_id, "val/mIoU"))
    # val_every=100: the one validation is the last step's (an earlier one would save a best checkpoint)
    assert val_steps == _report_steps(run_dir, "val/mIoU") == [16]
    for key in ("train/lr", "train/tiles_per_s", "train/data_wait_pct", "mem/peak_rss_gb"):  # with every report
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == sorted(loss_steps), key
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"recipe.yaml", "versions.json", "metrics.png", "metrics.csv", "model"} <= names
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == sorted(loss_steps)
    assert {"train/lr", "train/tiles_per_s", "train/data_wait_pct", "mem/peak_rss_gb", "val/mIoU"} <= set(
        acc.Tags()["scalars"])
    assert acc.Tags()["images"] == ["metrics_plot"]

    # credentials from the environment reached MLflow's client only: nothing written holds them
    assert _files_with(run_dir, SECRET.encode()) == []
    assert SECRET not in text + done.stdout + done.stderr

    # the export command on the finished run, to another folder than the run's own export
    out = launch(["export", str(run_dir), "--out", str(tmp_path / "export")], timeout=600)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "export" / "model.safetensors").stat().st_size > 1e6
    assert "step_00000016" in (tmp_path / "export" / "model.yaml").read_text()
