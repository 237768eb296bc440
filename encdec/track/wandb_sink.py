"""Weights & Biases: the same content as MLflow (config, metrics by step, recipe, plot, metrics.csv, model).

Offline mode writes only files (``<run_dir>/wandb``; ``wandb sync`` uploads them later). The W&B run id is kept in
``<run_dir>/tracking.json`` so a resumed run continues the same W&B run. The API key is W&B's own business
(``WANDB_API_KEY`` in the environment); nothing here reads or writes it.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from encdec.config.track import WandbConfig
from encdec.track.common import flatten, read_state, recipe_text, update_state
from encdec.track.hub import RunInfo

__all__ = ["WandbSink"]


class WandbSink:
    """One W&B run per encdec run (continued on resume)."""

    name = "wandb"

    def __init__(self, cfg: WandbConfig) -> None:
        self.cfg = cfg
        self.run: Any = None
        self.info: RunInfo | None = None

    def open(self, info: RunInfo) -> None:
        import wandb

        self.info = info
        run_id = read_state(info.run_dir).get("wandb", {}).get("id") or _new_id()
        update_state(info.run_dir, "wandb", {"id": run_id, "project": self.cfg.project, "mode": self.cfg.mode})
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True, save_code=False,
                                  disable_git=True)
        self.run = wandb.init(project=self.cfg.project, entity=self.cfg.entity, mode=self.cfg.mode,
                              dir=str(info.run_dir), id=run_id, resume="allow", name=info.run_name,
                              config=flatten(info.recipe), settings=settings, reinit="create_new")
        self.run.summary["versions"] = dict(info.versions)
        recipe_file = info.run_dir / "recipe.yaml"
        if not recipe_file.is_file():
            recipe_file = info.run_dir / "wandb" / "recipe.yaml"
            recipe_file.write_text(recipe_text(info.recipe))
        self.run.save(str(recipe_file), base_path=str(recipe_file.parent), policy="now")

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, status: str, files: Mapping[str, Path]) -> None:
        import wandb

        try:
            if "plot" in files:
                self.run.log({"metrics_plot": wandb.Image(str(files["plot"]))})
            if "metrics_csv" in files:
                self.run.save(str(files["metrics_csv"]), base_path=str(files["metrics_csv"].parent), policy="now")
            if "model" in files:
                art = wandb.Artifact(f"{self.run.id}-model", type="model")
                art.add_dir(str(files["model"]))
                self.run.log_artifact(art)
            self.run.summary["status"] = status
        finally:
            self.run.finish(exit_code=1 if status == "failed" else 0)


def _new_id() -> str:
    """A W&B run id (8 lowercase letters and digits, as W&B makes them)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
