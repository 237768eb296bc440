"""The pure DeepSpeed config function: recipe values land in DeepSpeed's own settings; bad values are named."""

from __future__ import annotations

import copy
import json

import pytest

from encdec.distributed import StrategyError
from encdec.distributed.deepspeed import deepspeed_config

OPTIM = {"name": "adamw", "lr": 3e-4, "weight_decay": 0.05, "grad_clip": 1.0, "grad_accum": 4}


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_recipe_values_map_to_deepspeed_settings(stage: int, precision: str) -> None:
    before = copy.deepcopy(OPTIM)
    cfg = deepspeed_config(OPTIM, zero_stage=stage, precision=precision, grad_accum=4, micro_batch=3, grad_clip=1.0)
    assert OPTIM == before, "the function must not modify its input"
    assert cfg == deepspeed_config(OPTIM, zero_stage=stage, precision=precision, grad_accum=4, micro_batch=3,
                                   grad_clip=1.0), "pure: same input, same output"
    json.dumps(cfg)  # DeepSpeed accepts a JSON file too: everything must serialise
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert "train_batch_size" not in cfg, "DeepSpeed derives it from the world size; fixing it here breaks resizes"
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] is (precision == "bf16")
    assert cfg["fp16"]["enabled"] is (precision == "fp16")
    if precision == "fp16":
        assert cfg["fp16"]["loss_scale"] == 0, "fp16 needs dynamic loss scaling"
    assert "optimizer" not in cfg, "the client (torch) optimizer is used unless native_optimizer"
    if stage == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False


def test_no_clipping_and_native_optimizer() -> None:
    cfg = deepspeed_config(OPTIM, zero_stage=2, precision="fp32", grad_accum=1, micro_batch=1, grad_clip=None)
    assert cfg["gradient_clipping"] == 0.0
    native = deepspeed_config(OPTIM, zero_stage=3, precision="bf16", grad_accum=1, micro_batch=1, grad_clip=0.5,
                              native_optimizer=True)
    assert native["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 3e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-8},
    }
    with pytest.raises(StrategyError, match="adamw"):
        deepspeed_config({"name": "sgd"}, zero_stage=3, precision="bf16", grad_accum=1, micro_batch=1,
                         grad_clip=None, native_optimizer=True)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"zero_stage": 1}, "zero_stage"),
        ({"precision": "auto"}, "precision"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"micro_batch": 2.5}, "micro_batch"),
        ({"grad_clip": -1.0}, "grad_clip"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    args = {"zero_stage": 3, "precision": "bf16", "grad_accum": 1, "micro_batch": 1, "grad_clip": 1.0, **kwargs}
    with pytest.raises(StrategyError, match=field):
        deepspeed_config(OPTIM, **args)
