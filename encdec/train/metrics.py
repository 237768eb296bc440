"""Validation metrics that are exact across ranks: every rank accumulates *counts* (a confusion matrix, sums
of squared errors and valid-target counts, loss sums and normalisers), the counts are all-reduced once, and only
then turned into ratios. Averaging per-rank IoUs or RMSEs would weight ranks instead of pixels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ClassificationMetrics", "LossMeter", "RegressionMetrics", "SegmentationMetrics", "all_reduce_sum", "build_metrics",
           "count_confusion"]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks (in place and returned); a no-op outside a process group.

    Counts are reduced in float64 on the CPU: exact for integers below 2**53, and gloo needs CPU tensors.
    NCCL needs device tensors, so there the tensor goes to the current CUDA device and back.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if dist.get_backend() == "nccl":
        buf = t.to(device=torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf)
        t.copy_(buf.to(t.device))
    else:
        dist.all_reduce(t)
    return t


def count_confusion(target: Tensor, pred: Tensor, num_classes: int) -> Tensor:
    """The ``[num_classes, num_classes]`` confusion counts (float64, CPU; rows: target, columns: prediction) of
    already-masked class ids: the one counting routine of validation, ``evaluate --split`` and whole-scene
    ``evaluate`` (each caller selects its valid pixels first)."""
    idx = (target.long() * num_classes + pred.long()).reshape(-1).cpu()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).double()


class SegmentationMetrics:
    """Confusion matrix over valid pixels -> per-class IoU, mIoU, pixel accuracy, mean class accuracy.

    Args:
        num_classes: number of classes.
        ignore_index: target value left out of every count.
        class_names: optional names used in the per-class keys (default: the class index).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = -1, class_names: list[str] | None = None) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = class_names or [str(i) for i in range(self.num_classes)]
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)

    def update(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch: ``logits`` ``[B, C, H, W]``, ``target`` ``[B, H, W]`` (rows = target, cols = prediction).

        ``valid`` (target's shape) further restricts the pixels counted, e.g. ``TaskLoss.valid_mask(batch)``,
        which leaves out padded samples.
        """
        pred = logits.argmax(dim=1)
        valid = _and(target != self.ignore_index if self.ignore_index is not None
                     else torch.ones_like(target, dtype=torch.bool), valid)
        self.confusion += count_confusion(target[valid], pred[valid], self.num_classes)

    def compute(self) -> dict[str, float]:
        """All-reduce the confusion matrix and return ``mIoU``, ``accuracy``, ``mAcc`` and ``IoU_<class>``.

        A class absent from both targets and predictions has no IoU; it is reported as NaN and left out of mIoU.
        """
        cm = all_reduce_sum(self.confusion.clone())
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = tp / union  # 0/0 -> nan for absent classes
        per_class_acc = tp / cm.sum(1)
        out: dict[str, float] = {
            "mIoU": _nanmean(iou),
            "accuracy": float(tp.sum() / cm.sum()) if cm.sum() > 0 else math.nan,
            "mAcc": _nanmean(per_class_acc),
        }
        for name, value in zip(self.class_names, iou.tolist()):
            out[f"IoU_{name}"] = value
        return out


class ClassificationMetrics(SegmentationMetrics):
    """Confusion matrix of ``[B, C]`` logits against ``[B]`` labels -> accuracy, mAcc, per-class IoU."""

    def update(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        super().update(logits.reshape(*logits.shape, 1, 1), target.reshape(-1, 1, 1),
                       None if valid is None else valid.reshape(-1, 1, 1))


class RegressionMetrics:
    """Sums of squared / absolute errors, of targets and squared targets, and the valid count -> RMSE, MAE and R²
    over all valid targets (R² = 1 - SSE / SST, with SST = sum(y²) - sum(y)²/n from the all-reduced sums).

    Args:
        ignore_index: nodata target value to skip (NaN targets are always skipped).
    """

    def __init__(self, ignore_index: float | None = None) -> None:
        self.ignore_index = ignore_index
        # squared error, absolute error, count, sum of targets, sum of squared targets
        self.totals = torch.zeros(5, dtype=torch.float64)

    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch of predictions and targets of the same shape (``valid``: see ``SegmentationMetrics``)."""
        valid = _and(~torch.isnan(target), valid)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        y = target[valid].double()
        diff = pred[valid].double() - y
        n = torch.tensor(diff.numel(), dtype=torch.float64, device=diff.device)
        self.totals += torch.stack([(diff * diff).sum(), diff.abs().sum(), n, y.sum(), (y * y).sum()]).cpu()

    def compute(self) -> dict[str, float]:
        """All-reduce and return ``rmse``, ``mae`` and ``r2`` (NaN when there was no valid target; ``r2`` NaN
        when the targets are constant)."""
        sq, ab, n, sy, syy = all_reduce_sum(self.totals.clone()).tolist()
        if n == 0:
            return {"rmse": math.nan, "mae": math.nan, "r2": math.nan}
        sst = syy - sy * sy / n
        return {"rmse": math.sqrt(sq / n), "mae": ab / n, "r2": 1.0 - sq / sst if sst > 0 else math.nan}


class LossMeter:
    """Loss sums and normalisers of a ``TaskLoss`` over many batches -> the loss over all of them."""

    def __init__(self, loss: Any) -> None:
        self.loss = loss
        n = len(loss.terms)
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.norms = torch.zeros(n, dtype=torch.float64)

    def update(self, output: Any, batch: Any) -> None:
        """Add one batch's loss sums and normalisers."""
        self.sums += self.loss.sums(output, batch).detach().double().cpu()
        self.norms += self.loss.normalizers(batch)

    def compute(self) -> float:
        """All-reduce and return the loss over every batch on every rank."""
        both = all_reduce_sum(torch.cat([self.sums, self.norms]))
        n = len(self.loss.terms)
        return float(self.loss.combine(both[:n], both[n:]))


def _and(mask: Tensor, extra: Tensor | None) -> Tensor:
    return mask if extra is None else mask & extra.to(mask.device)


def _nanmean(t: Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else math.nan


def build_metrics(task: str, *, num_classes: int | None, ignore_index: Any = -1) -> Any:
    """The metric accumulator for a task (``update(pred, target)`` / ``compute()``)."""
    if task == "segmentation":
        if num_classes is None:
            raise ValueError("segmentation metrics need model.num_classes; set it in the model section")
        return SegmentationMetrics(num_classes, ignore_index)
    if task == "classification":
        if num_classes is None:
            raise ValueError("classification metrics need model.num_classes; set it in the model section")
        return ClassificationMetrics(num_classes, ignore_index)
    if task in ("regression", "scalar_regression"):
        return RegressionMetrics(ignore_index)
    raise ValueError(f"task {task!r} has no metrics; use segmentation, regression, classification or scalar_regression")
