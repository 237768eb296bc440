"""Tracking backends read back with their own readers: TensorBoard's EventAccumulator, the MLflow client, W&B's
offline files; a resumed run continues the same runs without sending a step twice; a down server stops nothing."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from encdec.config.track import TrackConfig
from encdec.track import open_tracker

RECIPE = {"task": "segmentation", "run": {"name": "trk", "seed": 0}, "optim": {"lr": 0.001, "betas": [0.9, 0.99]},
          "train": {"max_steps": 20}}


def _report(step: int, loss: float) -> dict[str, object]:
    return {"step": step, "epoch": 0, "train/loss": loss, "train/lr": 1e-3, "train/tiles_per_s": 50.0,
            "train/data_wait_pct": 3.0, "mem/peak_rss_gb": 1.5, "checkpoint": None, "stopped": False}


def _files(tmp_path: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = tmp_path / "metrics.png"
    fig = plt.figure(figsize=(2, 2))
    plt.plot([0, 1], [1, 0])
    fig.savefig(png)
    plt.close(fig)
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,train/loss\n5,1.0\n")
    model = tmp_path / "export"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    return {"plot": png, "metrics_csv": csv, "model": model}


def _append_jsonl(run_dir: Path, reports: list[dict[str, object]]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        for r in reports:
            f.write(json.dumps(r) + "\n")


def _run(run_dir: Path, cfg: TrackConfig, reports: list[dict[str, object]], status: str,
         files: dict[str, Path] | None = None) -> list[str]:
    problems: list[str] = []
    tracker = open_tracker(cfg, run_dir, RECIPE, on_problem=problems.append)
    assert tracker is not None
    for r in reports:
        tracker.log(r)
    assert tracker.finish(status, files or {})
    _append_jsonl(run_dir, reports)  # what the engine writes beside the reports the driver forwards
    return problems


def test_tensorboard_and_mlflow_read_back_after_resume(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = TrackConfig.model_validate({"tensorboard": True, "flush_timeout_s": 180,
                                      "mlflow": {"experiment": "exp", "tags": {"team": "eo"}}})
    first = [_report(5, 1.0), _report(10, 0.8), {"step": 10, "val/loss": 0.7, "val/mIoU": 0.5}]
    assert _run(run_dir, cfg, first, "stopped") == []
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    # resume: the engine re-reports step 10 (after its last checkpoint at 5) and goes on to 15 and 20
    second = [_report(10, 0.79), {"step": 10, "val/loss": 0.69, "val/mIoU": 0.52}, _report(15, 0.6),
              _report(20, 0.5), {"step": 20, "val/loss": 0.4, "val/mIoU": 0.7}]
    assert _run(run_dir, cfg, second, "finished", _files(tmp_path)) == []

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"] == run_id  # the same run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["encdec.status"] == "finished"
    assert run.data.tags["team"] == "eo" and "encdec.version.torch" in run.data.tags
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["optim.betas"] == "[0.9, 0.99]"
    hist = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(5, 1.0), (10, 0.8), (15, 0.6), (20, 0.5)]
    assert [m.step for m in client.get_metric_history(run_id, "val/mIoU")] == [10, 20]
    for key in ("train/lr", "train/tiles_per_s", "train/data_wait_pct", "mem/peak_rss_gb", "epoch"):
        assert len(client.get_metric_history(run_id, key)) == 4, key
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"recipe.yaml", "versions.json", "metrics.png", "metrics.csv", "model"} <= names
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.safetensors"]
    assert (run_dir / "mlflow" / "artifacts").is_dir()  # artifacts stay inside the run directory

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/tiles_per_s", "train/data_wait_pct", "mem/peak_rss_gb",
            "val/mIoU"} <= set(tags["scalars"])
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == [(5, 1.0), (10, 0.8), (15, 0.6),
                                                                                (20, 0.5)]
    assert tags["images"] == ["metrics_plot"]
    assert {"recipe/text_summary", "status/text_summary"} <= set(acc.summary_metadata)  # text plugin tags
    recipe_text = b"".join(t.tensor_proto.string_val[0] for t in acc.Tensors("recipe/text_summary")).decode()
    assert "max_steps: 20" in recipe_text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_down_mlflow_server_is_reported_once_and_stops_nothing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = TrackConfig.model_validate({"tensorboard": True, "flush_timeout_s": 60,
                                      "mlflow": {"tracking_uri": f"http://127.0.0.1:{_closed_port()}"}})
    problems = _run(run_dir, cfg, [_report(s, 1.0 / s) for s in range(1, 30)], "finished", _files(tmp_path))
    assert len(problems) == 1 and "mlflow open failed" in problems[0] and "continues without it" in problems[0]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 29  # the other backend got everything


def test_full_queue_drops_oldest_and_never_blocks(tmp_path: Path) -> None:
    import threading

    from encdec.track.hub import RunInfo, Tracker

    gate = threading.Event()
    got: list[int] = []

    class Slow:
        name = "slow"

        def open(self, info: RunInfo) -> None:
            gate.wait(30)

        def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
            got.append(step)

        def finish(self, status: str, files: dict[str, Path]) -> None:
            pass

    tracker = Tracker([Slow()], RunInfo(tmp_path, "r", RECIPE, False), queue_size=10, flush_timeout_s=30)
    for s in range(1, 101):  # returns at once although the backend takes nothing until the gate opens
        tracker.log({"step": s, "train/loss": 1.0})
    gate.set()
    assert tracker.finish("finished")
    assert tracker.dropped == 91 and got == list(range(92, 101))  # the finish item took one slot
    assert any("91 reports were dropped" in p for p in tracker.problems)


def test_wandb_offline_writes_the_run_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "sk-test-never-written-0123456789abcdef0123")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = TrackConfig.model_validate({"wandb": {"project": "encdec-test", "mode": "offline"}, "flush_timeout_s": 180})
    assert _run(run_dir, cfg, [_report(5, 1.0), _report(10, 0.5)], "stopped") == []
    assert _run(run_dir, cfg, [_report(10, 0.4), _report(15, 0.3)], "finished", _files(tmp_path)) == []
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb"]["id"]
    offline = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # one folder per launch of the same W&B run id (wandb sync merges them)
    steps = _wandb_history_steps(offline, "train/loss")
    assert steps == [5, 10, 15]
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert b"sk-test-never-written" not in f.read_bytes(), f


def _wandb_records(log: Path) -> list[bytes]:
    """The records of a ``run-*.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB-log blocks
    of 32 KiB holding records ``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle,
    4: last)``, the format W&B's core writes."""
    import struct

    raw = log.read_bytes()
    assert raw[:4] == b":W&B"
    out: list[bytes] = []
    pending = b""
    pos, block = 7, 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(data)
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            out.append(pending + data)
    return out


def _wandb_records_to_exit(log: Path, timeout_s: float = 60.0) -> list[bytes]:
    """The log's records once its ``exit`` record is on disk: ``run.finish()`` returns when wandb-core has handled
    the exit, but its writer (another process) may not have flushed the last records yet (CI saw the final history
    row missing under load)."""
    import time

    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout_s
    while True:
        records = _wandb_records(log)
        kinds = []
        for data in records:
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kinds.append(rec.WhichOneof("record_type"))
        if "exit" in kinds or time.monotonic() > deadline:
            assert "exit" in kinds, f"{log} has no exit record after {timeout_s:g} s: {kinds}"
            return records
        time.sleep(0.2)


def _wandb_history_steps(folders: list[Path], key: str) -> list[int]:
    """Steps of ``key`` in the runs' binary logs, decoded with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    steps: list[int] = []
    for folder in folders:
        (log,) = folder.glob("run-*.wandb")
        for data in _wandb_records_to_exit(log):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
                if key in items:
                    steps.append(int(json.loads(items["_step"])))
    return steps
