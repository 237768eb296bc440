"""Trainable set, parameter counts, the freeze trap, bad configs, and what the adapted backbone still offers
(blocks for sharding/checkpointing, Prithvi's coordinate kwargs)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encdec.models import build_model
from encdec.models.peft import (
    PeftConfigError,
    QKVSep,
    TrainableSetError,
    check_trainable,
    freeze_backbone,
    get_peft_backbone,
    parameter_report,
)
from encdec.registry import BACKBONE_REGISTRY

LORA_QV = {
    "method": "LORA",
    "replace_qkv": "qkv",
    "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 16, "lora_alpha": 16},
}
NECKS = [{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}]


def tiny_model(peft_config: dict[str, Any] | None = LORA_QV, **kwargs: Any) -> nn.Module:
    return build_model(
        "segmentation", backbone="prithvi_eo_tiny", backbone_img_size=32, decoder="FCNDecoder",
        decoder_channels=16, necks=NECKS, num_classes=3, peft_config=peft_config, **kwargs,
    )


def test_prithvi_300m_lora_count_on_meta() -> None:
    with torch.device("meta"):
        model = build_model(
            "segmentation", backbone="prithvi_eo_v2_300", decoder="FCNDecoder", necks=NECKS, num_classes=2,
            peft_config=LORA_QV,
        )
    report = parameter_report(model)
    assert report["adapters"] == (1_572_864, 1_572_864)  # 24 blocks x (q, v) x (A + B) x 1024 x 16
    base = report["backbone-base"]
    assert base.trainable == 0
    assert base.total == BACKBONE_REGISTRY.metadata("prithvi_eo_v2_300")["num_params"]
    for part in ("decoder", "head"):
        assert report[part].trainable == report[part].total > 0
    assert report["total"].trainable == 1_572_864 + report["decoder"].total + report["head"].total
    assert isinstance(model.encoder.blocks[0].attn.qkv, QKVSep)


def test_tiny_counts_and_default_trainable_set() -> None:
    model = tiny_model()
    report = parameter_report(model)
    assert report["adapters"] == (4 * 2 * 2 * 256 * 16,) * 2
    assert report["backbone-base"].trainable == 0
    assert report["decoder"].trainable == report["decoder"].total > 0
    assert report["head"].trainable == report["head"].total > 0
    check_trainable(model)


def test_freeze_trap_is_an_error_and_freeze_backbone_is_safe() -> None:
    model = tiny_model()
    for p in model.encoder.parameters():  # what TerraTorch's freeze_encoder does after PEFT
        p.requires_grad = False
    assert parameter_report(model)["adapters"].trainable == 0
    with pytest.raises(TrainableSetError, match=r"adapter tensors of the backbone are frozen.*freeze_backbone"):
        check_trainable(model)
    model.encoder.requires_grad_(True)  # the opposite mistake: everything trainable
    assert freeze_backbone(model) == 4 * 2 * 2 * 256 * 16
    report = parameter_report(model)
    assert report["backbone-base"].trainable == 0 and report["adapters"].trainable == report["adapters"].total
    check_trainable(model)


def test_nothing_trainable_is_an_error() -> None:
    model = tiny_model(peft_config=None)
    model.requires_grad_(False)
    with pytest.raises(TrainableSetError, match="no trainable parameter"):
        check_trainable(model)


def test_frozen_adapters_at_build_are_an_error() -> None:
    cfg = {**LORA_QV, "peft_config_kwargs": {**LORA_QV["peft_config_kwargs"], "inference_mode": True}}
    with pytest.raises(TrainableSetError, match="none is trainable; remove inference_mode"):
        tiny_model(cfg)


def _kw(**kw: Any) -> dict[str, Any]:
    return {"method": "LORA", "replace_qkv": "qkv", "peft_config_kwargs": kw}


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        ({"method": "LORA", "target_modules": ["q"]}, r"unknown keys \['target_modules'\].*inside peft_config_kwargs"),
        ({"replace_qkv": "qkv"}, r"method must be a string, one of"),
        (_kw(r=4), r"target_modules is required for LORA.*qkv\.q_linear"),
        (_kw(target_modules=["qkv.q_lin"]), r"\['qkv.q_lin'\] match no module.*'qkv\.q_linear'"),
        (_kw(target_modules=["qkv.q_linear"], rank=4), r"options \['rank'\] that LoraConfig does not take.*'r'"),
        (_kw(target_modules=["qkv.q_linear"], init_lora_weights="pissa"), r"init_lora_weights='pissa' is not supp"),
        (_kw(target_modules=["qkv.q_linear"], modules_to_save=["norm"]), r"modules_to_save is not supported"),
        ({**_kw(target_modules=["qkv.q_linear"]), "replace_qkv": "qkvx"}, r"'qkvx' matches no module"),
        (
            {"method": "IA3", "peft_config_kwargs": {"target_modules": ["fc1"], "feedforward_modules": ["fc2"]}},
            r"feedforward_modules \['fc2'\] are not in target_modules",
        ),
    ],
)
def test_bad_configs_are_clear_errors(cfg: dict[str, Any], pattern: str) -> None:
    with pytest.raises(PeftConfigError, match=pattern):
        tiny_model(cfg)


class NoQKVEncoder(nn.Module):
    """An encoder with separate projections only (a CNN or an unfused ViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.out_channels = [8]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.proj(x.movedim(1, -1)).movedim(-1, 1)]


def test_replace_qkv_on_a_backbone_without_fused_qkv() -> None:
    with pytest.raises(PeftConfigError, match=r"no fused Linear.*set replace_qkv to null"):
        get_peft_backbone(_kw(target_modules=["proj"]), NoQKVEncoder())
    enc = get_peft_backbone({"method": "LORA", "peft_config_kwargs": {"target_modules": ["proj"], "r": 2}}, NoQKVEncoder())
    assert parameter_report(enc)["adapters"].trainable == 2 * (6 + 8)


def test_adapting_twice_is_an_error() -> None:
    enc = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32)
    get_peft_backbone(LORA_QV, enc)
    with pytest.raises(PeftConfigError, match="already carries peft adapters"):
        get_peft_backbone({**LORA_QV, "replace_qkv": None}, enc)


def test_adapted_blocks_checkpoint_and_train() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    torch.manual_seed(0)
    model = tiny_model()
    blocks = list(model.encoder.blocks)
    assert model.sharding_units()[: len(blocks)] == blocks and len(blocks) == 4
    x = torch.randn(2, 6, 32, 32)
    mask = torch.randint(0, 3, (2, 32, 32))
    F.cross_entropy(model(x).output, mask).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    apply_activation_checkpointing(model.encoder, check_fn=lambda m: m in blocks)
    F.cross_entropy(model(x).output, mask).backward()
    got = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(ref) and any("lora_B" in n for n in got)
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5)


def test_coordinate_kwargs_reach_the_adapted_encoder() -> None:
    torch.manual_seed(0)
    enc = BACKBONE_REGISTRY.build("prithvi_eo_v2_tiny_tl", img_size=32)
    get_peft_backbone(LORA_QV, enc)
    assert enc.out_channels == [192] * 12 and tuple(enc.patch_size) == (1, 16, 16)
    x = torch.randn(1, 6, 1, 32, 32)
    coords = {"temporal_coords": torch.tensor([[[2020.0, 100.0]]]), "location_coords": torch.tensor([[40.0, -3.0]])}
    with torch.no_grad():
        with_coords = enc(x, **coords)[-1]
        without = enc(x)[-1]
    assert with_coords.shape == (1, 5, 192) and (with_coords - without).abs().max() > 1e-4
