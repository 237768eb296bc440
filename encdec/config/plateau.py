"""``optim.plateau``: lower the learning rate when a validation metric stops improving (``schedule: plateau``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from encdec.config.early_stop import WatchedMetricConfig

__all__ = ["PlateauConfig"]


class PlateauConfig(WatchedMetricConfig):
    """torch's ``ReduceLROnPlateau``, counted in validations and decided from the all-reduced validation metrics.

    After more than ``patience`` validations without improvement of ``metric`` the learning rate is multiplied by
    ``factor`` (never below ``optim.min_lr``), then ``cooldown`` validations pass before counting starts again.
    Every rank takes the same decision at the same step; the state (best value, counts, reductions so far) is part
    of each checkpoint, so a resumed run continues where it stopped. The defaults are torch's.
    """

    factor: float = Field(0.1, gt=0, lt=1, description="Multiplier of the learning rate at each reduction.")
    patience: int = Field(10, ge=0, le=100000, description="Validations without improvement that are tolerated: "
                          "the LR drops at the next one (torch's semantics: patience 0 drops at the first).")
    threshold: float = Field(1e-4, ge=0, description="Smallest change that counts as an improvement (relative to "
                             "the best value or absolute, by threshold_mode).")
    threshold_mode: Literal["rel", "abs"] = Field(
        "rel", description="rel: better than best x (1 -/+ threshold); abs: better than best -/+ threshold.")
    cooldown: int = Field(0, ge=0, le=100000, description="Validations after a reduction during which no bad "
                          "validation is counted.")
