"""Experiment tracking (``track:``): TensorBoard, MLflow and W&B fed by the driver with rank 0's reports.

Workers never talk to a tracking backend: the driver's :class:`~encdec.track.hub.Tracker` does, from a background
thread. ``open_tracker`` builds it from the recipe's ``track`` section; each backend's library is imported only
when that backend is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from encdec.config.track import TrackConfig
from encdec.track.hub import RunInfo, Tracker, watermarks_from_jsonl

__all__ = ["RunInfo", "Tracker", "open_tracker"]


def open_tracker(track: TrackConfig | None, run_dir: Path, recipe: Mapping[str, Any], *,
                 on_problem: Callable[[str], None] | None = None) -> Tracker | None:
    """A started tracker for ``track`` (None when no backend is configured).

    Args:
        track: the recipe's ``track`` section.
        run_dir: the run directory (the embedded MLflow store, W&B's offline files and ``tracking.json`` go there).
        recipe: the resolved recipe (as written to ``recipe.yaml``).
        on_problem: called with a one-line message the first time a backend fails.
    """
    if track is None or not track.enabled:
        return None
    from encdec.track.common import versions

    sinks: list[Any] = []
    if track.tensorboard:
        from encdec.track.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(track.tensorboard))
    if track.mlflow is not None:
        from encdec.track.mlflow_sink import MlflowSink

        sinks.append(MlflowSink(track.mlflow))
    if track.wandb is not None:
        from encdec.track.wandb_sink import WandbSink

        sinks.append(WandbSink(track.wandb))
    marks = watermarks_from_jsonl(run_dir / "metrics.jsonl")
    info = RunInfo(run_dir=run_dir, run_name=run_dir.name, recipe=dict(recipe), resumed=bool(marks),
                   versions=versions())
    return Tracker(sinks, info, queue_size=track.queue_size, flush_timeout_s=track.flush_timeout_s,
                   on_problem=on_problem, watermarks=marks)
