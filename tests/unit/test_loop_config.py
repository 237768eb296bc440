"""The ``train:`` section as the loop receives it (``encdec.config.TrainSection``), and the pieces of the loop
that need no process group: strategy options, the trainable set, RNG state."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from encdec.config import TrainSection
from encdec.models.peft import TrainableSetError, set_trainable
from encdec.train.loop_parts import capture_rng, restore_rng, seed_everything, strategy_options


def test_defaults_and_best_metric() -> None:
    cfg = TrainSection(max_steps=10, max_failures=3, strategy="fsdp")
    assert cfg.max_steps == 10 and cfg.strategy == "fsdp" and cfg.precision == "auto"
    assert TrainSection(max_steps=1).strategy == "ddp" and TrainSection(max_steps=1).val_every == 500  # one default
    assert cfg.best_metric_for("segmentation") == "val/mIoU" and cfg.best_mode_for("segmentation") == "max"
    assert cfg.best_metric_for("regression") == "val/rmse" and cfg.best_mode_for("regression") == "min"
    custom = TrainSection(epochs=2, best_metric="val/loss")
    assert custom.best_mode_for("segmentation") == "min"


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"max_steps": 10, "max_step": 5}, r"max_step\n\s+Extra inputs are not permitted"),
        ({"precision": "bf16"}, "exactly one of train.max_steps or train.epochs"),
        ({"max_steps": 10, "log_every": 0}, r"log_every\n\s+Input should be greater than or equal to 1"),
        ({"max_steps": -1}, r"max_steps\n\s+Input should be greater than or equal to 1"),
        ({"max_steps": 10, "zero_stage": 1}, r"zero_stage\n\s+Input should be 2 or 3"),
        ({"max_steps": 10, "best_mode": "up"}, r"best_mode\n\s+Input should be 'max' or 'min'"),
        ({"max_steps": 10, "pg_timeout_s": 0}, r"pg_timeout_s\n\s+Input should be greater than or equal to 10"),
    ],
)
def test_bad_sections(section: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TrainSection.model_validate(section)


def test_strategy_options() -> None:
    cfg = TrainSection(max_steps=1, strategy="deepspeed", zero_stage=2)
    opts = strategy_options(cfg, peft=True, global_batch_size=16, grad_accum=2, world_size=4)
    assert {k: opts[k] for k in ("adapter_only", "zero_stage", "micro_batch")} == {
        "adapter_only": True, "zero_stage": 2, "micro_batch": 2}
    assert opts["pg_timeout_s"] == 1800 and "reshard_after_forward" not in opts
    full = TrainSection(max_steps=1, strategy="fsdp", adapter_only=False, pg_timeout_s=60)
    opts = strategy_options(full, peft=True, global_batch_size=16, grad_accum=1, world_size=2)
    assert {k: opts[k] for k in ("adapter_only", "reshard_after_forward", "build_on_rank0", "pg_timeout_s")} == {
        "adapter_only": False, "reshard_after_forward": True, "build_on_rank0": True, "pg_timeout_s": 60}
    every_rank = TrainSection(max_steps=1, strategy="fsdp", build_on_rank0=False)
    opts = strategy_options(every_rank, peft=False, global_batch_size=16, grad_accum=1, world_size=2)
    assert opts["build_on_rank0"] is False and opts["adapter_only"] is False


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.decoder = nn.Linear(2, 2)


def test_freeze() -> None:
    net = _Net()
    assert tuple(set_trainable(net, freeze_backbone=True, freeze_decoder=False)) == (6, 12)
    assert not net.encoder.weight.requires_grad and net.decoder.weight.requires_grad
    with pytest.raises(TrainableSetError, match="no parameter is trainable"):
        set_trainable(net, freeze_backbone=True, freeze_decoder=True)


def test_freeze_keeps_peft_adapters_and_check_trainable_catches_the_trap() -> None:
    """The loop's trainable set: freeze_backbone on a PEFT model leaves the adapters trainable; an encoder frozen
    wholesale after PEFT (TerraTorch's freeze_encoder) is what check_trainable, called before the optimizer, stops."""
    from encdec.models import build_model
    from encdec.models.peft import check_trainable

    net = build_model("segmentation", backbone="prithvi_eo_tiny", backbone_pretrained=False, backbone_img_size=32,
                      necks=[{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}],
                      decoder="FCNDecoder", decoder_channels=16, num_classes=2,
                      peft_config={"method": "LORA", "replace_qkv": "qkv",
                                   "peft_config_kwargs": {"target_modules": ["qkv.q_linear"], "r": 2}})
    set_trainable(net, freeze_backbone=True, freeze_decoder=True)
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
