"""TensorBoard: event files with every metric, the resolved recipe as text and the metrics plot at the end."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from encdec.track.common import recipe_text
from encdec.track.hub import RunInfo

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Writes ``<dir>`` event files (``track.tensorboard: true`` -> ``<run_dir>/tensorboard``; a path -> a
    subfolder per run there, so one ``tensorboard --logdir PATH`` compares runs). A resumed run appends a new
    event file to the same folder; the tracker never sends a step twice."""

    name = "tensorboard"

    def __init__(self, setting: bool | str) -> None:
        self.setting = setting
        self.writer: Any = None
        self.last_step = 0
        self.log_dir: Path | None = None

    def open(self, info: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        base = info.run_dir / "tensorboard" if self.setting is True else Path(str(self.setting)) / info.run_dir.name
        base.mkdir(parents=True, exist_ok=True)
        self.log_dir = base
        self.writer = SummaryWriter(log_dir=str(base), flush_secs=10)
        # indented: TensorBoard renders text as markdown, and an indented block keeps the YAML as it is
        text = "\n".join("    " + line for line in recipe_text(info.recipe).splitlines())
        self.writer.add_text("recipe", text, global_step=0)
        self.writer.add_text("versions", "\n".join(f"    {k}: {v}" for k, v in info.versions.items()), global_step=0)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.last_step = max(self.last_step, step)

    def finish(self, status: str, files: Mapping[str, Path]) -> None:
        try:
            plot = files.get("plot")
            if plot is not None:
                import matplotlib.image as mpimg

                image = mpimg.imread(str(plot))[..., :3]  # RGBA floats in [0, 1] -> RGB
                self.writer.add_image("metrics_plot", image, global_step=self.last_step, dataformats="HWC")
            self.writer.add_text("status", status, global_step=self.last_step)
        finally:
            self.writer.close()
