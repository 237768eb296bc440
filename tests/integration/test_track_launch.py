"""Tracking and early stopping through the real driver (``encdec-launch`` on the shared local Ray cluster):
MLflow and TensorBoard read back after a resume, no credentials left behind, a down MLflow server stops nothing,
and a stalled run ends ``early-stopped`` with its best checkpoint exported."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
from launcher_testlib import launch, quick_args, run_dirs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SECRET = "pw-must-not-leak-7f3a9c"


def _small(tiles: Path, storage: Path, cluster: object, *extra: str) -> list[str]:
    return quick_args(tiles, storage, "--address", cluster.gcs_address,  # type: ignore[attr-defined]
                      "--workers-per-node", "1", "--set", "train.log_every=2", *extra)


def _files_with(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_mlflow_and_tensorboard_after_resume(ray_cluster: object, quick_tiles: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    storage = tmp_path / "runs"
    env = {"MLFLOW_TRACKING_PASSWORD": SECRET, "MLFLOW_TRACKING_USERNAME": "alice"}
    first = launch(_small(quick_tiles, storage, ray_cluster, "--set", "train.max_steps=8", "--set", "train.val_every=4",
                          "--set", "train.ckpt_every=4", "--set", "run.export=false", "--set", "track.tensorboard=true",
                          "--set", "track.mlflow.experiment=itest", "--set", "track.mlflow.tags={team: eo}"), env=env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    (run_dir,) = run_dirs(storage)
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    again = launch(["--resume", str(run_dir), "--address", ray_cluster.gcs_address,  # type: ignore[attr-defined]
                    "--no-progress", "--set", "train.max_steps=12", "--set", "run.export=true"], env=env)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert run_dirs(storage) == [run_dir]
    assert "tracking" in again.stdout and "problem" not in again.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"] == run_id  # same MLflow run
    (only,) = client.search_runs([client.get_experiment_by_name("itest").experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    assert only.data.tags["team"] == "eo" and only.data.tags["encdec.status"] == "finished"
    assert only.data.params["optim.lr"] == "0.001" and only.data.params["train.strategy"] == "ddp"
    loss_steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(loss_steps) == [2, 4, 6, 8, 10, 12]  # both launches, each step once
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/mIoU")) == [4, 8, 12]
    for key in ("train/lr", "train/tiles_per_s", "train/data_wait_pct", "mem/peak_rss_gb"):
        assert len(client.get_metric_history(run_id, key)) == 6, key
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"recipe.yaml", "versions.json", "metrics.png", "metrics.csv", "model"} <= names
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert {"train/lr", "train/tiles_per_s", "train/data_wait_pct", "mem/peak_rss_gb", "val/mIoU"} <= set(
        acc.Tags()["scalars"])
    assert acc.Tags()["images"] == ["metrics_plot"]

    # credentials from the environment reached MLflow's client only: nothing written holds them
    assert _files_with(run_dir, SECRET.encode()) == []
    assert SECRET not in first.stdout + first.stderr + again.stdout + again.stderr


def test_down_mlflow_server_does_not_stop_the_run(ray_cluster: object, quick_tiles: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = tmp_path / "runs"
    out = launch(_small(quick_tiles, storage, ray_cluster, "--set", "train.max_steps=4", "--set", "train.val_every=4",
                        "--set", "run.export=false", "--set", "track.tensorboard=true",
                        "--set", f"track.mlflow.tracking_uri=http://127.0.0.1:{port}"),
                 env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout + out.stderr
    assert text.count("mlflow open failed") == 1 and "training continues without it" in text
    assert "step 4/4" in text or "│ steps" in text
    (run_dir,) = run_dirs(storage)
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # the other backend still wrote


def test_stalled_run_ends_early_stopped_and_exports(ray_cluster: object, quick_tiles: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "runs"
    out = launch(_small(quick_tiles, storage, ray_cluster, "--set", "train.max_steps=40", "--set", "train.val_every=2",
                        "--set", "train.ckpt_every=100", "--set", "optim.lr=1e-9", "--set", "optim.warmup_steps=0",
                        "--set", "train.early_stop={metric: val/loss, mode: min, patience: 2, min_delta: 0.01}",
                        "--set", "track.mlflow.experiment=stall"))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "early-stopped" in out.stdout
    (run_dir,) = run_dirs(storage)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert rows[-1]["step"] == "6" and rows[-1]["status"] == "early-stopped"
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()
    assert (run_dir / "export" / "model.safetensors").is_file()  # the best checkpoint was exported
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    run = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}").get_run(run_id)
    assert run.data.tags["encdec.status"] == "early-stopped" and run.info.status == "FINISHED"
