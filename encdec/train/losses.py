"""Task losses, written as *sums* over a batch plus *normalisers* that depend on the targets only.

Why sums: a global batch is split across ranks and accumulation micro-batches, and with ignored pixels
(``ignore_index``) or class weights each piece has a different number (weight) of valid targets. The mean of
per-piece means is then not the mean over the global batch. The loop instead all-reduces the normalisers of the
whole global step before the first backward and divides each piece's sum by the global normaliser, so the
gradient equals the single-process gradient on the whole batch (what torchtune does with token counts).

Loss section (``loss:`` in the recipe, ``encdec.config.LossSection``):

* ``name``: segmentation ``ce`` | ``dice`` | ``ce_dice``; regression ``mse`` | ``l1`` (alias ``mae``) |
  ``huber``; classification ``ce``; scalar_regression ``mse`` | ``l1`` | ``huber``.
* ``ignore_index``: target value to skip (segmentation / classification, default -1); for regression a nodata
  value to skip (default none; NaN targets are always skipped).

Padded and bad samples (``sample_id == -1``: the data fills a global batch with them, and with -1 masks / NaN
regression targets / -1 labels) never count, whatever ``ignore_index`` is: a regression or scalar label of -1
would otherwise be a real target, and a -1 class with ``ignore_index: 255`` an error.
* ``class_weights``: per-class weights of the cross-entropy (``null`` = equal).
* ``dice_weight`` (``ce_dice`` only, default 1.0), ``dice_smooth`` (default 1.0), ``huber_delta`` (default 1.0).
* ``aux_weights``: ``{aux head name: weight}``; auxiliary heads not listed get weight 1.0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from encdec.config import LOSSES, LossSection

__all__ = ["LOSSES", "PAD_SAMPLE_ID", "LossConfigError", "TaskLoss", "build_loss", "target_of"]

PAD_SAMPLE_ID = -1
"""``sample_id`` of a padded or bad sample (the data contract, INTERFACES.md)."""



class LossConfigError(ValueError):
    """The ``loss:`` section does not fit the task."""


def target_of(task: str, batch: Mapping[str, Any]) -> Tensor:
    """The target tensor of a batch: ``mask`` for pixel-wise tasks, ``label`` for scalar ones."""
    key = "mask" if task in ("segmentation", "regression") else "label"
    if key not in batch:
        raise KeyError(f"task {task!r} needs batch[{key!r}] as its target; the batch has keys {sorted(batch)}")
    return batch[key]


class TaskLoss:
    """The loss of one task. ``terms`` are the additive parts (``ce`` and ``dice`` for ``ce_dice``).

    ``normalizers(batch)`` and ``sums(output, batch)`` each return one value per term;
    ``loss = sum(weight_t * sums_t / normalizers_t)``. ``__call__`` gives that loss for one batch alone.
    """

    def __init__(
        self,
        task: str,
        name: str,
        *,
        ignore_index: int | float | None = -1,
        class_weights: Sequence[float] | None = None,
        dice_weight: float = 1.0,
        dice_smooth: float = 1.0,
        huber_delta: float = 1.0,
        aux_weights: Mapping[str, float] | None = None,
    ) -> None:
        if task not in LOSSES:
            raise LossConfigError(f"task {task!r} has no losses; use one of {', '.join(LOSSES)}")
        if name not in LOSSES[task]:
            raise LossConfigError(
                f"loss.name {name!r} does not fit task {task!r}; use one of {', '.join(LOSSES[task])}"
            )
        if class_weights is not None and task not in ("segmentation", "classification"):
            raise LossConfigError(f"loss.class_weights is only for segmentation/classification, not {task!r}; remove it")
        self.task = task
        self.name = "l1" if name == "mae" else name
        self.ignore_index = ignore_index
        self.class_weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.dice_smooth = float(dice_smooth)
        self.huber_delta = float(huber_delta)
        self.aux_weights = dict(aux_weights or {})
        if self.name == "ce_dice":
            self.terms: tuple[str, ...] = ("ce", "dice")
            self.term_weights = torch.tensor([1.0, float(dice_weight)], dtype=torch.float64)
        else:
            self.terms = (self.name,)
            self.term_weights = torch.ones(1, dtype=torch.float64)

    # -- targets ------------------------------------------------------------------------------------------
    def _valid(self, target: Tensor) -> Tensor:
        """Boolean mask of targets that count."""
        if target.is_floating_point():
            valid = ~torch.isnan(target)
            if self.ignore_index is not None and self.task != "segmentation":
                valid &= target != self.ignore_index
            return valid
        if self.ignore_index is None:
            return torch.ones_like(target, dtype=torch.bool)
        return target != self.ignore_index

    def valid_mask(self, batch: Mapping[str, Any]) -> Tensor:
        """Boolean mask (the target's shape) of the targets that count: not ignored, not NaN, and not in a padded
        or bad sample (``sample_id == -1``)."""
        target = target_of(self.task, batch)
        valid = self._valid(target)
        ids = batch.get("sample_id")
        if ids is not None:
            rows = torch.as_tensor(ids).to(valid.device) != PAD_SAMPLE_ID
            valid = valid & rows.reshape(-1, *([1] * (valid.dim() - 1)))
        return valid

    def _check_classes(self, target: Tensor, valid: Tensor, num_classes: int) -> None:
        valid = target[valid]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
            raise ValueError(
                f"target class {bad} is outside 0..{num_classes - 1} (the model has {num_classes} classes) and is "
                f"not loss.ignore_index={self.ignore_index!r}; fix model.num_classes or loss.ignore_index"
            )

    def normalizers(self, batch: Mapping[str, Any]) -> Tensor:
        """Per-term normalisers of this batch (float64, no grad): valid target count (weighted by class
        weight for ``ce``), or the number of samples for ``dice``."""
        target = target_of(self.task, batch)
        valid = self.valid_mask(batch)
        out = []
        for term in self.terms:
            if term == "dice":  # one term per sample that has any valid pixel (an empty sample adds 0 to the sum)
                out.append(float(valid.reshape(valid.shape[0], -1).any(dim=1).sum()))
            elif term == "ce" and self.class_weights is not None:
                idx = target[valid].long()
                if idx.numel() and int(idx.max()) >= self.class_weights.numel():
                    raise ValueError(
                        f"target class {int(idx.max())} has no entry in loss.class_weights "
                        f"({self.class_weights.numel()} given); give one weight per class"
                    )
                out.append(float(self.class_weights[idx].sum()))
            else:
                out.append(float(valid.sum()))
        return torch.tensor(out, dtype=torch.float64)

    # -- sums ---------------------------------------------------------------------------------------------
    def _term_sum(self, term: str, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        pred = pred.float()  # losses in fp32 whatever the compute dtype
        if term == "ce":
            if pred.dim() != target.dim() + 1:
                raise ValueError(
                    f"cross-entropy needs logits with one more dim than the target; got {tuple(pred.shape)} "
                    f"logits for a {tuple(target.shape)} target"
                )
            self._check_classes(target, valid, pred.shape[1])
            weight = None if self.class_weights is None else self.class_weights.to(pred.device)
            # every target that does not count becomes cross_entropy's own ignore value
            labels = torch.where(valid, target.long(), torch.full_like(target, -100, dtype=torch.long))
            return F.cross_entropy(pred, labels, weight=weight, ignore_index=-100, reduction="sum")
        if term == "dice":
            return self._dice_sum(pred, target, valid)
        if pred.shape != target.shape:
            raise ValueError(
                f"regression output {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape; "
                "a single-output regression model returns [B, H, W] (or [B] for scalar_regression)"
            )
        diff = pred[valid] - target[valid].float()
        if term == "mse":
            return (diff * diff).sum()
        if term == "l1":
            return diff.abs().sum()
        return F.huber_loss(diff, torch.zeros_like(diff), delta=self.huber_delta, reduction="sum")

    def _dice_sum(self, logits: Tensor, target: Tensor, valid_mask: Tensor) -> Tensor:
        """Sum over samples of ``1 - mean_c dice_c`` with softmax probabilities, ignored pixels left out (a sample
        without any valid pixel adds nothing)."""
        num_classes = logits.shape[1]
        self._check_classes(target, valid_mask, num_classes)
        valid = valid_mask.unsqueeze(1).to(logits.dtype)  # [B,1,H,W]
        labels = torch.where(valid_mask, target.long(), torch.zeros_like(target, dtype=torch.long))
        probs = logits.softmax(dim=1) * valid
        onehot = F.one_hot(labels, num_classes).movedim(-1, 1).to(logits.dtype) * valid
        dims = tuple(range(2, logits.dim()))
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.dice_smooth) / (denom + self.dice_smooth)  # [B, C]
        counts = valid_mask.reshape(valid_mask.shape[0], -1).any(dim=1).to(logits.dtype)
        return ((1 - dice.mean(dim=1)) * counts).sum()

    def _head_sums(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        return torch.stack([self._term_sum(term, pred, target, valid) for term in self.terms])

    def sums(self, output: Any, batch: Mapping[str, Any]) -> Tensor:
        """Per-term loss sums of this batch (differentiable), auxiliary heads added with their weights.

        Args:
            output: a ``ModelOutput`` (``.output``, ``.auxiliary_heads``) or a plain tensor.
            batch: the batch the output came from.
        """
        target = target_of(self.task, batch)
        valid = self.valid_mask(batch)
        main = getattr(output, "output", output)
        total = self._head_sums(main, target, valid)
        for name, aux in (getattr(output, "auxiliary_heads", None) or {}).items():
            total = total + float(self.aux_weights.get(name, 1.0)) * self._head_sums(aux, target, valid)
        return total

    def combine(self, sums: Tensor, normalizers: Tensor) -> Tensor:
        """``sum_t weight_t * sums_t / normalizers_t`` (a zero normaliser means no valid target: term 0)."""
        weights = self.term_weights.to(device=sums.device, dtype=sums.dtype)
        norms = normalizers.to(device=sums.device, dtype=sums.dtype).clamp(min=1e-12)
        return (weights * sums / norms).sum()

    def __call__(self, output: Any, batch: Mapping[str, Any]) -> Tensor:
        """The loss of this batch on its own (its mean over valid targets)."""
        return self.combine(self.sums(output, batch), self.normalizers(batch))


def build_loss(task: str, loss: LossSection) -> TaskLoss:
    """Build the loss from the recipe's ``loss:`` section (defaults per task: ``LossSection.name_for``).

    Raises:
        LossConfigError: a loss name that does not fit the task.
    """
    return TaskLoss(
        task,
        loss.name_for(task),
        ignore_index=loss.ignore_index_for(task),
        class_weights=loss.class_weights,
        dice_weight=1.0 if loss.dice_weight is None else loss.dice_weight,
        dice_smooth=1.0 if loss.dice_smooth is None else loss.dice_smooth,
        huber_delta=1.0 if loss.huber_delta is None else loss.huber_delta,
        aux_weights=loss.aux_weights,
    )
