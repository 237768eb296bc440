"""The ``train:`` section as the loop reads it, and the pieces of the loop that need no process group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encdec.train.loop_parts import LoopConfig, LoopConfigError, capture_rng, freeze, restore_rng, seed_everything


def test_defaults_and_launcher_keys() -> None:
    cfg = LoopConfig.from_section({"max_steps": 10, "max_failures": 3, "strategy": "fsdp"})
    assert cfg.max_steps == 10 and cfg.strategy == "fsdp" and cfg.precision == "auto"
    assert cfg.best_metric("segmentation") == "val/mIoU" and cfg.best_mode("segmentation") == "max"
    assert cfg.best_metric("regression") == "val/rmse" and cfg.best_mode("regression") == "min"
    custom = LoopConfig.from_section({"epochs": 2, "best_metric": "val/loss"})
    assert custom.best_mode("segmentation") == "min"


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"max_steps": 10, "max_step": 5}, r"unknown keys \['max_step'\]"),
        ({"precision": "bf16"}, "needs max_steps"),
        ({"max_steps": 10, "log_every": 0}, r"train.log_every must be >= 1"),
        ({"max_steps": -1}, r"train.max_steps must be an integer >= 0"),
        ({"max_steps": 10, "zero_stage": 1}, r"zero_stage must be 2 or 3"),
        ({"max_steps": 10, "best_mode": "up"}, r"best_mode must be 'max' or 'min'"),
    ],
)
def test_bad_sections(section: dict, match: str) -> None:
    with pytest.raises(LoopConfigError, match=match):
        LoopConfig.from_section(section)


def test_strategy_options() -> None:
    cfg = LoopConfig.from_section({"max_steps": 1, "strategy": "deepspeed", "zero_stage": 2})
    opts = cfg.strategy_options({"peft_config": {"method": "LORA"}}, {"global_batch_size": 16}, 2, 4)
    assert opts == {"adapter_only": True, "zero_stage": 2, "micro_batch": 2}
    full = LoopConfig.from_section({"max_steps": 1, "strategy": "fsdp", "adapter_only": False})
    assert full.strategy_options({"peft_config": {}}, {"global_batch_size": 16}, 1, 2) == {
        "adapter_only": False, "reshard_after_forward": True, "build_on_rank0": True}
    every_rank = LoopConfig.from_section({"max_steps": 1, "strategy": "fsdp", "build_on_rank0": False})
    assert every_rank.strategy_options({}, {"global_batch_size": 16}, 1, 2)["build_on_rank0"] is False


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.decoder = nn.Linear(2, 2)


def test_freeze() -> None:
    net = _Net()
    assert freeze(net, freeze_backbone=True, freeze_decoder=False) == (6, 12)
    assert not net.encoder.weight.requires_grad and net.decoder.weight.requires_grad
    with pytest.raises(LoopConfigError, match="no parameter is trainable"):
        freeze(net, freeze_backbone=True, freeze_decoder=True)


def test_freeze_keeps_peft_adapters_and_check_trainable_catches_the_trap() -> None:
    """The loop's trainable set: freeze_backbone on a PEFT model leaves the adapters trainable; an encoder frozen
    wholesale after PEFT (TerraTorch's freeze_encoder) is what check_trainable, called before the optimizer, stops."""
    from encdec.models import build_model
    from encdec.models.peft import TrainableSetError, check_trainable

    net = build_model("segmentation", backbone="prithvi_eo_tiny", backbone_pretrained=False, backbone_img_size=32,
                      necks=[{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}],
                      decoder="FCNDecoder", decoder_channels=16, num_classes=2,
                      peft_config={"method": "LORA", "replace_qkv": "qkv",
                                   "peft_config_kwargs": {"target_modules": ["qkv.q_linear"], "r": 2}})
    freeze(net, freeze_backbone=True, freeze_decoder=True)
    check_trainable(net)
    assert {n for n, p in net.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in net.encoder.named_parameters() if p.requires_grad)
    net.encoder.requires_grad_(False)
    with pytest.raises(TrainableSetError, match="adapter tensors of the backbone are frozen"):
        check_trainable(net)


def test_rng_roundtrip_and_reseed_on_world_size_change() -> None:
    seed_everything(3, rank=0)
    state = capture_rng()
    a = torch.rand(3)
    restore_rng(state, same_world=True, seed=3, rank=0, step=5)
    assert torch.equal(torch.rand(3), a)
    restore_rng(state, same_world=False, seed=3, rank=1, step=5)
    b = torch.rand(3)
    restore_rng(state, same_world=False, seed=3, rank=1, step=5)
    assert torch.equal(torch.rand(3), b) and not torch.equal(a, b)
