"""What each Ray Train worker runs: the engine's ``train`` with reports mapped to ``ray.train.report``.

Resuming: a run directory belongs to one run (``encdec.launcher.rundir``), so a worker always continues from the
newest complete checkpoint in it - after a worker-group restart (FailureConfig), a ``--resume`` or a Slurm
requeue alike. Checkpoints are written by the engine straight into the run directory (Ray's storage path), so
they are reported with ``NO_UPLOAD``: Ray records them without copying, and retention is the engine's
(``keep_last`` + best).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from encdec.config.checks import is_number

__all__ = ["train_loop_per_worker"]

_METRIC_NAMES = {
    "train/loss": "encdec_train_loss",
    "val/mIoU": "encdec_val_miou",
    "val/loss": "encdec_val_loss",
    "train/tiles_per_s": "encdec_tiles_per_second",
    "train/data_wait_pct": "encdec_data_wait_percent",
    "step": "encdec_step",
}


class _Gauges:
    """Run metrics exported through Ray's metrics API (Prometheus endpoint of each node, dashboard/Grafana)."""

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {key: Gauge(name, description=f"encdec-launch {key}", tag_keys=("run",))
                       for key, name in _METRIC_NAMES.items()}

    def set(self, metrics: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            value = metrics.get(key)
            if is_number(value):
                gauge.set(float(value), tags=self.tags)


def _reset_peak_rss() -> bool:
    """Restart this process's peak-RSS count (Linux ``VmHWM``); True when the kernel took it.

    Ray may hand a worker actor a pooled process that ran other work before; its lifetime peak (``ru_maxrss``)
    would then describe that work, not this run.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gb() -> float:
    """Peak RSS since ``_reset_peak_rss`` (``VmHWM``), else over the process's life (``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _peak_memory() -> dict[str, float]:
    """This run's peak memory in this process: RSS on CPU, and the CUDA allocator's peak when a GPU is used."""
    out = {"mem/peak_rss_gb": _peak_rss_gb()}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["mem/cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    except Exception:  # memory stats are informative only
        pass
    return out


def _current_rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except (OSError, ValueError):
        return 0.0


def _exec_env(name: str) -> str | None:
    """``name`` as this process was started with (what glibc read at exec), not as Python may have changed it."""
    try:
        with open("/proc/self/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                key, _, value = item.partition(b"=")
                if key.decode(errors="replace") == name:
                    return value.decode(errors="replace")
    except OSError:  # not Linux: the Python view is the best there is
        return os.environ.get(name)
    return None


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Ray reports must be JSON-friendly scalars."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _log_file(run_dir: Path, rank: int) -> logging.Handler:
    """This worker's ``encdec`` log lines (INFO and up) in ``RUN_DIR/logs/rank<N>.log`` (``encdec-launch logs``)."""
    (run_dir / "logs").mkdir(exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("encdec")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # the console still gets WARNING and up only (Python's last-resort handler)
    logger.addHandler(handler)
    return handler


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function.

    ``config`` holds the task and the recipe's typed sections (``model``, ``loss``, ``data``, ``optim``, ``train``:
    ``encdec.config`` objects), ``seed``, ``init_from``, the ``run_dir`` and the driver's progress ``sink`` actor
    (or None).
    """
    import ray
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    from encdec.launcher.rundir import latest_checkpoint
    from encdec.train.loop import train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    run_dir = Path(config["run_dir"])
    sink = config.get("sink")
    # Tests (and operators) find a worker's process here, e.g. to kill one and watch the run recover; the
    # RSS before the model exists is the runtime's own footprint (torch, Ray, gloo), the plan's "runtime" term.
    record = {
        "pid": os.getpid(), "node_rank": ctx.get_node_rank(), "node_id": ray.get_runtime_context().get_node_id(),
        "started": time.time(), "start_rss_gb": _current_rss_gb(), "peak_rss_reset": _reset_peak_rss(),
        "malloc_mmap_threshold": _exec_env("MALLOC_MMAP_THRESHOLD_"),
    }
    pid_file = run_dir / "workers" / f"rank{rank}.json"
    pid_file.parent.mkdir(exist_ok=True)
    pid_file.write_text(json.dumps(record))
    gauges = _Gauges(run_dir.name) if rank == 0 else None
    checked: dict[str, Any] = {"at": 0.0, "stop": False}

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        metrics = {**metrics, **_peak_memory()}
        if rank == 0:
            if sink is not None:
                sink.push.remote(_plain(metrics))
            if gauges is not None:
                gauges.set(metrics)
        checkpoint = Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(_plain(metrics), checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    def stop_requested() -> bool:
        # The engine all-reduces this flag every step; asking the driver's actor at most once a second is enough.
        if sink is None:
            return False
        now = time.monotonic()
        if now - checked["at"] >= 1.0:
            checked["at"] = now
            checked["stop"] = bool(ray.get(sink.should_stop.remote()))
        return checked["stop"]

    resume = str(run_dir) if latest_checkpoint(run_dir) is not None else None
    handler = _log_file(run_dir, rank)
    try:
        final = train(  # the engine ignores init_from when it resumes (the run's own checkpoint wins)
            task=config["task"], model=config["model"], loss=config["loss"], data=config["data"],
            optim=config["optim"], train=config["train"], seed=int(config["seed"]), run_dir=str(run_dir),
            resume=resume, report=report, stop_requested=stop_requested, init_from=config.get("init_from"),
        )
    except BaseException:
        # into this rank's log only: Ray prints the traceback on the console itself
        handler.handle(logging.LogRecord("encdec.worker", logging.ERROR, __file__, 0, "rank %d failed", (rank,),
                                         sys.exc_info()))
        raise
    finally:
        logging.getLogger("encdec").removeHandler(handler)
        handler.close()
    peak = _peak_memory()
    pid_file.write_text(json.dumps({**record, **peak, "final_step": final.get("step")}))
    if sink is not None:
        sink.finished.remote(rank, _plain({**final, **peak}))
