"""``train.early_stop``: end a run whose validation metric has stopped improving."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EarlyStopConfig", "WatchedMetricConfig"]


class WatchedMetricConfig(BaseModel):
    """The validation metric a decision watches, and which way is better (``train.early_stop``, ``optim.plateau``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    metric: str = Field("val/loss", description="Validation metric watched (a key of the val report: val/loss, "
                        "val/mIoU, val/accuracy, val/rmse...).")
    mode: Literal["min", "max"] = Field("min", description="min: lower is better (losses, RMSE); max: higher is "
                                        "better (mIoU, accuracy).")


class EarlyStopConfig(WatchedMetricConfig):
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` validations.

    Decided from the all-reduced validation metrics, so every rank takes the same decision at the same step. The
    run then checkpoints, exports its best checkpoint and ends with status ``early-stopped``.
    """

    patience: int = Field(3, ge=1, le=100000, description="Validations without improvement before the run stops "
                          "(counted in validations, not steps: val_every x patience steps).")
    min_delta: float = Field(0.0, ge=0, description="An improvement must exceed this to reset the patience counter.")
