"""The plateau schedule: the decision matches torch's ReduceLROnPlateau validation for validation, the LR it
gives ``lr_at`` (with warmup), its checkpointed state, and the ``optim.plateau`` section."""

from __future__ import annotations

import math
import random

import pytest
import torch
from pydantic import ValidationError

from encdec.config import OptimSection
from encdec.config.plateau import PlateauConfig
from encdec.train.optim import lr_at
from encdec.train.plateau import PlateauError, PlateauScheduler

CASES = [
    {"mode": "min", "factor": 0.5, "patience": 0, "threshold": 0.0, "threshold_mode": "abs", "cooldown": 0},
    {"mode": "min", "factor": 0.1, "patience": 2, "threshold": 1e-2, "threshold_mode": "rel", "cooldown": 1},
    {"mode": "max", "factor": 0.3, "patience": 1, "threshold": 0.05, "threshold_mode": "abs", "cooldown": 2},
    {"mode": "max", "factor": 0.5, "patience": 3, "threshold": 1e-4, "threshold_mode": "rel", "cooldown": 0},
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("min_lr", [0.0, 0.02])
def test_lr_after_each_validation_matches_torch(case: dict, min_lr: float) -> None:
    rng = random.Random(len(str(case)) + int(min_lr * 100))
    # a noisy metric that mostly stalls, with NaN now and then: every branch of the decision is taken
    values = [rng.choice([math.nan] + [round(rng.uniform(0.4, 0.6), 3)] * 9) for _ in range(60)]
    ours = PlateauScheduler(PlateauConfig(**case), lr=1.0, min_lr=min_lr)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=min_lr, **case)
    drops = 0
    for v in values:
        before = opt.param_groups[0]["lr"]
        lowered = ours.update({"val/loss": v, "val/mIoU": 0.0})
        ref.step(v)
        after = opt.param_groups[0]["lr"]
        assert lowered == (after < before)
        assert ours.lr == pytest.approx(after, rel=1e-9)
        drops += lowered
    assert drops >= 2  # the sequences do exercise reductions


def test_patience_and_cooldown_count_validations() -> None:
    s = PlateauScheduler(PlateauConfig(patience=1, cooldown=1, factor=0.5, threshold=0.0, threshold_mode="abs"),
                         lr=1.0)
    # best 1.0; two bad -> drop; cooldown ignores one bad; two more bad -> drop
    got = [s.update({"val/loss": v}) for v in [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    assert got == [False, False, True, False, False, True]
    assert s.reductions == 2 and s.lr == 0.25


def test_floor_stops_reductions() -> None:
    s = PlateauScheduler(PlateauConfig(patience=0, factor=0.1), lr=1.0, min_lr=0.05)
    got = [s.update({"val/loss": 1.0}) for _ in range(4)]
    assert got == [False, True, True, False]  # 1 -> 0.1 -> 0.05 (the floor), then nothing to lower
    assert s.lr == 0.05 and s.reductions == 2


def test_state_round_trip_continues() -> None:
    a = PlateauScheduler(PlateauConfig(patience=2, factor=0.5, threshold=0.0), lr=1.0)
    for v in [1.0, 2.0, 2.0, 2.0, 2.0]:  # one drop, then one bad validation counted
        a.update({"val/loss": v})
    assert (a.reductions, a.bad) == (1, 1)
    b = PlateauScheduler(PlateauConfig(patience=2, factor=0.5, threshold=0.0), lr=1.0)
    b.load_state_dict(a.state_dict())
    assert b.lr == 0.5
    assert [b.update({"val/loss": 2.0}) for _ in range(2)] == [False, True]  # the count went on across the resume
    c = PlateauScheduler(PlateauConfig(metric="val/mIoU", mode="max", factor=0.5), lr=1.0)
    c.load_state_dict(a.state_dict())  # another metric: count afresh, but the LR keeps its reductions
    assert (c.best, c.bad, c.reductions) == (None, 0, 1)
    c.load_state_dict(None)
    assert c.reductions == 1


def test_missing_metric_names_it() -> None:
    s = PlateauScheduler(PlateauConfig(metric="val/miou"), lr=1.0)
    with pytest.raises(PlateauError, match=r"optim\.plateau\.metric='val/miou'.*\['val/loss'"):
        s.update({"val/loss": 1.0})


def test_lr_at_warms_up_to_the_lowered_lr() -> None:
    cfg = OptimSection.model_validate({"lr": 1.0, "schedule": "plateau", "warmup_steps": 4})
    assert [lr_at(s, cfg, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(1, cfg, 100, plateau_lr=0.1) == pytest.approx(0.05)
    assert lr_at(50, cfg, 100, plateau_lr=0.1) == 0.1
    cosine = OptimSection.model_validate({"lr": 1.0})
    assert lr_at(50, cosine, 100, plateau_lr=0.1) == lr_at(50, cosine, 100)  # only the plateau schedule reads it


def test_section_defaults_and_errors() -> None:
    cfg = OptimSection.model_validate({"schedule": "plateau"})
    assert cfg.plateau == PlateauConfig()  # torch's defaults, written out
    assert (cfg.plateau.factor, cfg.plateau.patience, cfg.plateau.threshold) == (0.1, 10, 1e-4)
    assert OptimSection.model_validate({}).plateau is None
    assigned = OptimSection()
    assigned.schedule = "plateau"  # an assignment (validated) fills the defaults too
    assert assigned.plateau == PlateauConfig()
    given = OptimSection.model_validate({"schedule": "plateau", "plateau": {"factor": 0.5, "patience": 2}})
    assert given.plateau is not None and (given.plateau.factor, given.plateau.patience) == (0.5, 2)
    for bad in ({"factor": 1.0}, {"factor": 0}, {"patience": -1}, {"mode": "up"}, {"monitor": "val/loss"}):
        with pytest.raises(ValidationError) as err:
            OptimSection.model_validate({"schedule": "plateau", "plateau": bad})
        assert "plateau." + next(iter(bad)) in str(err.value).replace("\n", ".")


RECIPE = {
    "task": "segmentation",
    "model": {"backbone": "prithvi_eo_tiny", "decoder": "FCNDecoder", "num_classes": 2},
    "data": {"train": {"tiles": "/data/train"}, "val": {"tiles": "/data/val"}, "global_batch_size": 4},
    "train": {"max_steps": 10},
}


def _recipe(optim: dict, *, val: bool = True, train: dict | None = None) -> dict:
    data = {**RECIPE["data"]} if val else {k: v for k, v in RECIPE["data"].items() if k != "val"}
    return {**RECIPE, "data": data, "optim": optim, "train": {**RECIPE["train"], **(train or {})}}


def test_recipe_rules_name_the_field_and_the_fix() -> None:
    from encdec.launcher.recipe.errors import RecipeError
    from encdec.launcher.recipe.validate import recipe_from_dict

    ok = recipe_from_dict(_recipe({"schedule": "plateau", "plateau": {"metric": "val/mIoU", "mode": "max"}}))
    assert ok.optim.plateau is not None and ok.optim.plateau.metric == "val/mIoU"
    assert recipe_from_dict(ok.to_yaml_dict()).optim == ok.optim  # the run's recipe.yaml loads back the same
    cases = [
        (_recipe({"schedule": "plateau", "plateau": {"metric": "val/miou"}}), "optim.plateau.metric",
         "Did you mean 'val/mIoU'"),
        (_recipe({"schedule": "plateau"}, val=False), "optim.plateau.metric", "data.val is not set"),
        (_recipe({"plateau": {"factor": 0.5}}), "optim.plateau", "optim.schedule: plateau"),
        (_recipe({}, train={"early_stop": {"metric": "val/rmse"}}), "train.early_stop.metric", "val/mIoU"),
        (_recipe({}, val=False, train={"early_stop": {}}), "train.early_stop.metric", "data.val is not set"),
    ]
    for data, path, words in cases:
        with pytest.raises(RecipeError) as err:
            recipe_from_dict(data)
        assert path in err.value.paths() and words in str(err.value), str(err.value)
