"""Names every layer agrees on: tasks, strategies, precisions, the HLS bands and their statistics, losses per task.

Defined once here (the bottom layer); the schema's ``Literal`` fields, the model factory, the data pipeline, the
engine and the planner all import them from this module.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "BEST_DEFAULTS",
    "HLS_BANDS",
    "HLS_MEANS",
    "HLS_STDS",
    "LOSSES",
    "PRECISIONS",
    "STRATEGIES",
    "TASKS",
    "LossName",
    "PrecisionName",
    "StrategyName",
    "TaskName",
]

TaskName = Literal["segmentation", "regression", "classification", "scalar_regression"]
TASKS: tuple[str, ...] = get_args(TaskName)

StrategyName = Literal["none", "ddp", "fsdp", "deepspeed"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)

PrecisionName = Literal["auto", "bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)

LossName = Literal["ce", "dice", "ce_dice", "mse", "l1", "mae", "huber"]
#: the losses that fit each task (``mae`` is an alias of ``l1``)
LOSSES: dict[str, tuple[str, ...]] = {
    "segmentation": ("ce", "dice", "ce_dice"),
    "regression": ("mse", "l1", "mae", "huber"),
    "classification": ("ce",),
    "scalar_regression": ("mse", "l1", "mae", "huber"),
}

# Prithvi-EO-2.0 HLS statistics (REFERENCE.md, reflectance x 1e4), the defaults for the six HLS bands.
HLS_BANDS: tuple[str, ...] = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
HLS_MEANS: tuple[float, ...] = (1087.0, 1342.0, 1433.0, 2734.0, 1958.0, 1363.0)
HLS_STDS: tuple[float, ...] = (2248.0, 2179.0, 2178.0, 1850.0, 1242.0, 1049.0)

#: the validation metric (and its direction) that picks the best checkpoint when ``train.best_metric`` is unset
BEST_DEFAULTS: dict[str, tuple[str, str]] = {
    "segmentation": ("val/mIoU", "max"),
    "classification": ("val/accuracy", "max"),
    "regression": ("val/rmse", "min"),
    "scalar_regression": ("val/rmse", "min"),
}
