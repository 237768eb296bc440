"""Losses: equal to torch's reference losses, and exactly decomposable into sums over pieces of a batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from encdec.config import LossSection
from encdec.models.model import ModelOutput
from encdec.train.losses import LossConfigError, TaskLoss, build_loss


def _seg_batch(b: int = 4, c: int = 3, hw: int = 8, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, hw, hw, generator=g, requires_grad=True)
    mask = torch.randint(0, c, (b, hw, hw), generator=g)
    # uneven ignored pixels: sample 0 mostly ignored, sample 3 not at all
    mask[0, :6] = -1
    mask[1, :2] = -1
    return logits, {"mask": mask}


def test_ce_matches_torch_mean_with_ignore_index() -> None:
    logits, batch = _seg_batch()
    loss = build_loss("segmentation", LossSection.model_validate({"name": "ce", "ignore_index": -1}))
    ref = F.cross_entropy(logits, batch["mask"], ignore_index=-1)
    torch.testing.assert_close(loss(ModelOutput(logits), batch), ref)


def test_ce_class_weights_match_torch_weighted_mean() -> None:
    logits, batch = _seg_batch()
    weights = [0.2, 1.0, 3.0]
    loss = build_loss("segmentation", LossSection.model_validate({"name": "ce", "ignore_index": -1, "class_weights": weights}))
    ref = F.cross_entropy(logits, batch["mask"], weight=torch.tensor(weights), ignore_index=-1)
    torch.testing.assert_close(loss(logits, batch), ref)


@pytest.mark.parametrize("name", ["ce", "dice", "ce_dice"])
def test_split_batch_with_global_normalizers_equals_whole_batch(name: str) -> None:
    """What the loop does across ranks/micro-batches: per-piece sums over the global normaliser add up to the
    whole-batch loss, while the mean of per-piece means does not (uneven ignored pixels)."""
    logits, batch = _seg_batch()
    loss = build_loss("segmentation", LossSection.model_validate({"name": name, "class_weights": [0.5, 1.0, 2.0] if name != "dice" else None}))
    whole = loss(logits, batch)
    pieces = [(logits[i : i + 2], {"mask": batch["mask"][i : i + 2]}) for i in (0, 2)]
    norms = sum(loss.normalizers(b) for _, b in pieces)
    combined = sum(loss.combine(loss.sums(out, b), norms) for out, b in pieces)
    torch.testing.assert_close(combined, whole)
    if name != "dice":  # dice is per-sample, so equal pieces average exactly; ce is per-pixel
        mean_of_means = sum(loss(out, b) for out, b in pieces) / 2
        assert not torch.allclose(mean_of_means, whole)


def test_dice_perfect_prediction_is_zero_and_matches_hand_computation() -> None:
    mask = torch.tensor([[[0, 1], [1, -1]]])
    perfect = F.one_hot(mask.clamp(min=0), 2).movedim(-1, 1).float() * 100.0
    loss = TaskLoss("segmentation", "dice", dice_smooth=0.0)
    assert float(loss(perfect, {"mask": mask})) == pytest.approx(0.0, abs=1e-6)

    logits = torch.zeros(1, 2, 2, 2)  # p = 0.5 everywhere
    # valid pixels: 3 (one of class 0, two of class 1). class 0: inter .5, denom 1.5+1 -> dice 0.4;
    # class 1: inter 1, denom 1.5+2 -> dice 4/7; loss = 1 - mean
    expected = 1 - (0.4 + 4 / 7) / 2
    assert float(loss(logits, {"mask": mask})) == pytest.approx(expected, rel=1e-6)


def test_ce_dice_is_weighted_sum() -> None:
    logits, batch = _seg_batch()
    ce = build_loss("segmentation", LossSection.model_validate({"name": "ce"}))(logits, batch)
    dice = build_loss("segmentation", LossSection.model_validate({"name": "dice"}))(logits, batch)
    both = build_loss("segmentation", LossSection.model_validate({"name": "ce_dice", "dice_weight": 0.5}))(logits, batch)
    torch.testing.assert_close(both, ce + 0.5 * dice)


def test_aux_heads_are_weighted() -> None:
    logits, batch = _seg_batch()
    aux = logits.detach() * 2
    loss = build_loss("segmentation", LossSection.model_validate({"name": "ce", "aux_weights": {"aux": 0.25}}))
    out = loss(ModelOutput(logits, {"aux": aux}), batch)
    torch.testing.assert_close(out, loss(logits, batch) + 0.25 * loss(aux, batch))


@pytest.mark.parametrize(("name", "ref"), [("mse", F.mse_loss), ("l1", F.l1_loss), ("mae", F.l1_loss), ("huber", F.huber_loss)])
def test_regression_losses_skip_nan_and_match_torch(name: str, ref) -> None:
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 5, 5, generator=g)
    target = torch.randn(2, 5, 5, generator=g)
    target[0, 0, :3] = float("nan")
    valid = ~torch.isnan(target)
    loss = build_loss("regression", LossSection.model_validate({"name": name, "ignore_index": None}))
    torch.testing.assert_close(loss(pred, {"mask": target}), ref(pred[valid], target[valid]))


def test_regression_ignore_index_is_a_nodata_value() -> None:
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, -9999.0], [3.0, -9999.0]]])
    loss = build_loss("regression", LossSection.model_validate({"name": "mse", "ignore_index": -9999}))
    assert float(loss(pred, {"mask": target})) == pytest.approx((1 + 9) / 2)


def test_classification_ce_uses_label() -> None:
    logits = torch.randn(6, 4)
    label = torch.tensor([0, 1, 2, 3, -1, 1])
    loss = build_loss("classification", LossSection.model_validate({"name": "ce"}))
    ref = F.cross_entropy(logits, label, ignore_index=-1)
    torch.testing.assert_close(loss(logits, {"label": label}), ref)


def test_all_ignored_batch_gives_zero_not_nan() -> None:
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = build_loss("segmentation", LossSection.model_validate({"name": "ce"}))
    value = loss(logits, {"mask": torch.full((1, 3, 3), -1)})
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_bad_config_errors_name_the_field() -> None:
    with pytest.raises(LossConfigError, match=r"loss.name 'mse' does not fit task 'segmentation'"):
        build_loss("segmentation", LossSection.model_validate({"name": "mse"}))
    with pytest.raises(ValidationError, match=r"weights\n\s+Extra inputs are not permitted"):
        LossSection.model_validate({"name": "ce", "weights": [1, 2]})
    with pytest.raises(LossConfigError, match="class_weights is only for"):
        build_loss("regression", LossSection.model_validate({"name": "mse", "class_weights": [1.0]}))


def test_target_outside_classes_is_a_clear_error() -> None:
    loss = build_loss("segmentation", LossSection.model_validate({"name": "ce"}))
    with pytest.raises(ValueError, match=r"target class 5 is outside 0..2"):
        loss(torch.randn(1, 3, 2, 2), {"mask": torch.tensor([[[0, 5], [1, 2]]])})
    with pytest.raises(KeyError, match="needs batch\\['mask'\\]"):
        loss(torch.randn(1, 3, 2, 2), {"label": torch.tensor([1])})


def _with_padding(batch: dict, key: str, fill: float) -> dict:
    """``batch`` with a padded sample (sample_id -1, target ``fill``) in front, as the data pads a batch."""
    target = batch[key]
    pad = torch.full_like(target[:1], fill)
    ids = torch.arange(target.shape[0] + 1) - 1  # -1, 0, 1, ...
    return {key: torch.cat([pad, target]), "sample_id": ids}


@pytest.mark.parametrize(
    ("task", "section", "key", "fill"),
    [
        ("regression", {"name": "mse"}, "mask", float("nan")),  # what the data writes for regression padding
        ("regression", {"name": "huber"}, "mask", -1.0),  # a finite value still does not count
        ("scalar_regression", {"name": "l1"}, "label", -1.0),  # a -1 label is a real value for regression
        ("segmentation", {"name": "ce", "ignore_index": 255}, "mask", -1),  # -1 is no class and not ignore_index
        ("segmentation", {"name": "ce_dice"}, "mask", -1),
        ("classification", {"name": "ce", "class_weights": [1.0, 2.0, 3.0]}, "label", -1),
    ],
)
def test_padded_samples_never_count(task: str, section: dict, key: str, fill: float) -> None:
    """A padded/bad sample (sample_id -1) leaves loss and normaliser as if the batch did not hold it, with finite
    gradients, whatever its target holds and whatever ignore_index is."""
    g = torch.Generator().manual_seed(3)
    if task in ("regression", "segmentation"):
        logits = torch.randn(3, 3, 4, 4, generator=g)
        target = torch.randn(3, 4, 4, generator=g) if task == "regression" else torch.randint(0, 3, (3, 4, 4), generator=g)
        if task == "regression":
            logits = logits[:, 0]
            target[1, 0, :2] = float("nan")  # NaN targets of a real sample are skipped too
    else:
        logits = torch.randn(3, 3, generator=g) if task == "classification" else torch.randn(3, generator=g)
        target = torch.randint(0, 3, (3,), generator=g) if task == "classification" else torch.randn(3, generator=g)
    loss = build_loss(task, LossSection.model_validate(section))
    plain = {key: target}
    padded = _with_padding(plain, key, fill)
    pred = torch.cat([torch.randn_like(logits[:1]), logits]).requires_grad_(True)
    want = loss(logits, plain)
    got = loss(pred, padded)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(loss.normalizers(padded), loss.normalizers(plain))
    got.backward()
    assert torch.isfinite(pred.grad).all() and float(pred.grad[0].abs().sum()) == 0.0
