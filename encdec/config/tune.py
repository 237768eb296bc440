"""The ``tune:`` recipe section: a hyperparameter search on Ray Tune (``encdec-launch tune RECIPE``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TuneConfig"]


class TuneConfig(BaseModel):
    """How ``encdec-launch tune`` searches. Each trial is a normal training run with its own run directory."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    metric: str | None = Field(None, description="Validation metric the search optimises (val/loss, val/mIoU...); "
                               "null = train.best_metric or the task's default (val/mIoU for segmentation).")
    mode: Literal["min", "max"] | None = Field(None, description="min or max; null = the default of the metric "
                                               "(max for mIoU/accuracy, min for losses and RMSE).")
    trials: int = Field(8, ge=1, le=10000, description="Trials to run (`--trials` overrides).")
    max_concurrent: int = Field(1, ge=1, le=1024, description="Trials running at once, at most; fewer when the "
                                "cluster cannot hold that many (each trial's workers plus its own driver CPU).")
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop trials whose metric is behind at "
                                               "grace_steps, 2x, 4x... ; none: every trial runs to the end.")
    search: Literal["random", "optuna"] = Field("random", description="random sampling (seeded by run.seed) or "
                                                "Optuna's TPE.")
    grace_steps: int | None = Field(None, ge=1, description="Steps every trial runs before ASHA may stop it; null = "
                                    "train.val_every (the first validation).")
    trial_cpus: float = Field(0.5, ge=0, description="CPUs reserved for each trial's own driver (besides its "
                              "workers), counted in the cluster fit check.")
    space: dict[str, str] = Field(
        default_factory=dict, description="Search space: recipe key -> choice(a, b, ...) | uniform(lo, hi) | "
        "loguniform(lo, hi) | randint(lo, hi) (hi excluded), e.g. {optim.lr: 'loguniform(1e-5, 1e-3)'}; "
        "`--search KEY=SPACE` adds to it.")
