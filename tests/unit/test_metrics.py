"""Metrics: hand-checked values, and exactness across ranks (all-reduced counts, not means of per-rank means)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from encdec.config import LossSection
from encdec.train.losses import build_loss
from encdec.train.metrics import LossMeter, RegressionMetrics, SegmentationMetrics, build_metrics


def _onehot_logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, num_classes).movedim(-1, 1).float()


def test_segmentation_metrics_by_hand() -> None:
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, -1, -1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 2]]])
    m = SegmentationMetrics(3, ignore_index=-1, class_names=["water", "land", "cloud"])
    m.update(_onehot_logits(pred, 3), target)
    out = m.compute()
    # class 0: tp 1, fp 1 (pixel 5), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert out["IoU_water"] == pytest.approx(1 / 3)
    assert out["IoU_land"] == pytest.approx(2 / 3)
    assert out["IoU_cloud"] == pytest.approx(1 / 2)
    assert out["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["accuracy"] == pytest.approx(4 / 6)  # ignored pixels count nowhere
    assert out["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_absent_class_is_nan_and_left_out_of_miou() -> None:
    m = SegmentationMetrics(3)
    m.update(_onehot_logits(torch.tensor([[0, 1]]), 3), torch.tensor([[0, 1]]))
    out = m.compute()
    assert math.isnan(out["IoU_2"])
    assert out["mIoU"] == pytest.approx(1.0)


def test_regression_metrics() -> None:
    m = RegressionMetrics()
    m.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, float("nan")]))
    m.update(torch.tensor([5.0]), torch.tensor([1.0]))
    out = m.compute()
    assert out["rmse"] == pytest.approx(math.sqrt((1 + 0 + 16) / 3))
    assert out["mae"] == pytest.approx(5 / 3)
    y, p = np.array([0.0, 2.0, 1.0]), np.array([1.0, 2.0, 5.0])
    assert out["r2"] == pytest.approx(1 - ((p - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def test_r2_of_a_perfect_and_of_a_mean_predictor() -> None:
    target = torch.tensor([1.0, 2.0, 4.0, 9.0])
    perfect, mean = RegressionMetrics(), RegressionMetrics()
    perfect.update(target.clone(), target)
    mean.update(torch.full((4,), float(target.mean())), target)
    assert perfect.compute()["r2"] == pytest.approx(1.0)
    assert mean.compute()["r2"] == pytest.approx(0.0, abs=1e-12)
    flat = RegressionMetrics()
    flat.update(torch.ones(3), torch.full((3,), 2.0))
    assert math.isnan(flat.compute()["r2"])  # constant targets: R² undefined, not a division error


def test_classification_metrics() -> None:
    m = build_metrics("classification", num_classes=2)
    m.update(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0, 1]))
    assert m.compute()["accuracy"] == pytest.approx(2 / 3)


def test_loss_meter_equals_loss_over_all_batches() -> None:
    loss = build_loss("segmentation", LossSection.model_validate({"name": "ce"}))
    logits = torch.randn(4, 3, 5, 5)
    mask = torch.randint(0, 3, (4, 5, 5))
    mask[0] = -1
    meter = LossMeter(loss)
    meter.update(logits[:1], {"mask": mask[:1]})
    meter.update(logits[1:], {"mask": mask[1:]})
    assert meter.compute() == pytest.approx(float(loss(logits, {"mask": mask})), rel=1e-6)


# --------------------------------------------------------------------------------- across 2 gloo processes
def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 3, 8, 8, generator=g)
    mask = torch.randint(0, 3, (6, 8, 8), generator=g)
    mask[:2, :7] = -1  # rank 0's samples are mostly ignored: per-rank means would be weighted wrongly
    reg_pred, reg_target = torch.randn(6, 8, 8, generator=g), torch.randn(6, 8, 8, generator=g)
    reg_target[:2, :7] = float("nan")
    return logits, mask, reg_pred, reg_target


def _metrics_of(idx: slice) -> dict[str, float]:
    logits, mask, reg_pred, reg_target = _data()
    seg = SegmentationMetrics(3)
    seg.update(logits[idx], mask[idx])
    reg = RegressionMetrics()
    reg.update(reg_pred[idx], reg_target[idx])
    meter = LossMeter(build_loss("segmentation", LossSection.model_validate({"name": "ce"})))
    meter.update(logits[idx], {"mask": mask[idx]})
    return {**seg.compute(), **reg.compute(), "loss": meter.compute()}


def _worker(rank: int, world: int, rendezvous: str, queue) -> None:
    # a file rendezvous: a TCP port picked beforehand could be taken by another xdist worker before rank 0 binds it
    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=world)
    try:
        # uneven split: rank 0 gets 2 samples, rank 1 gets 4
        queue.put((rank, _metrics_of(slice(0, 2) if rank == 0 else slice(2, 6))))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_metrics_are_exact_across_ranks(tmp_path: Path) -> None:
    rendezvous = str(tmp_path / "rendezvous")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, rendezvous, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = _metrics_of(slice(0, 6))
    assert results[0] == results[1]
    for key in ("mIoU", "accuracy", "rmse", "mae", "r2"):
        assert results[0][key] == pytest.approx(single[key], rel=1e-9), key
    assert results[0]["loss"] == pytest.approx(single["loss"], rel=1e-6)  # fp32 sums in a different order
    # the naive mean of per-rank values is measurably different, so the test can tell the two apart
    naive = (_metrics_of(slice(0, 2))["rmse"] + _metrics_of(slice(2, 6))["rmse"]) / 2
    assert abs(naive - single["rmse"]) > 1e-3


def test_valid_mask_leaves_padded_samples_out_of_every_metric() -> None:
    """evaluate() passes TaskLoss.valid_mask(batch): padded samples (sample_id -1) are not counted even where
    their target would be (ignore_index None, or a finite regression target)."""
    loss = build_loss("segmentation", LossSection.model_validate({"name": "ce", "ignore_index": None}))
    target = torch.tensor([[[-1, -1]], [[0, 1]]])
    batch = {"mask": target, "sample_id": torch.tensor([-1, 7])}
    seg = SegmentationMetrics(2, ignore_index=None)
    seg.update(_onehot_logits(torch.tensor([[[0, 0]], [[0, 1]]]), 2), target, valid=loss.valid_mask(batch))
    assert seg.compute()["accuracy"] == 1.0 and float(seg.confusion.sum()) == 2.0

    reg_loss = build_loss("regression", LossSection.model_validate({"name": "mse"}))
    reg_target = torch.tensor([[5.0, 5.0], [1.0, float("nan")]])
    reg = RegressionMetrics()
    reg.update(torch.zeros(2, 2), reg_target, valid=reg_loss.valid_mask({"mask": reg_target, "sample_id": torch.tensor([-1, 3])}))
    out = reg.compute()
    assert (out["rmse"], out["mae"]) == (1.0, 1.0) and math.isnan(out["r2"])  # both valid targets are 5
