"""``build_run_model``: the one builder of the run's model (worker, export, plan, --init-from check)."""

from __future__ import annotations

import pytest
import torch

from encdec.config import ModelSection, TrainSection
from encdec.models.peft import TrainableSetError, check_trainable, parameter_report
from encdec.train.build import build_run_model

LORA = ModelSection.model_validate({
    "backbone": "prithvi_eo_tiny", "backbone_pretrained": False, "backbone_img_size": 32, "decoder": "FCNDecoder",
    "decoder_channels": 8, "num_classes": 2,
    "necks": [{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}],
    "peft_config": {"method": "LORA", "replace_qkv": "qkv",
                    "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 2}},
})


def test_standin_adapters_count_like_peft_on_meta() -> None:
    real = build_run_model("segmentation", LORA, device="meta")
    standin = build_run_model("segmentation", LORA, device="meta", adapters="standin")
    assert all(p.is_meta for p in standin.parameters())
    assert parameter_report(standin) == parameter_report(real)
    assert parameter_report(real)["adapters"].trainable > 0 and parameter_report(real)["backbone-base"].trainable == 0


def test_freeze_flags_keep_the_adapters() -> None:
    torch.manual_seed(0)
    net = build_run_model("segmentation", LORA, TrainSection(max_steps=1, freeze_backbone=True, freeze_decoder=True))
    report = parameter_report(net)
    assert report["adapters"].trainable == report["adapters"].total > 0
    assert report["decoder"].trainable == 0 and report["backbone-base"].trainable == 0
    assert report["head"].trainable == report["head"].total > 0  # the head is not the decoder: it still trains
    net.encoder.requires_grad_(False)  # the freeze trap, had anything frozen the adapters after PEFT
    with pytest.raises(TrainableSetError, match="adapter tensors of the backbone are frozen"):
        check_trainable(net)


def test_meta_build_reads_no_weights_and_init_from_loads_them(tmp_path) -> None:
    missing = LORA.model_copy(update={"peft_config": None})
    # a weights file that does not exist is never opened on the meta device (the plan, the --init-from check)
    build_run_model("segmentation", missing, device="meta", init_from=str(tmp_path / "absent.ckpt"))
    torch.manual_seed(1)
    source = build_run_model("segmentation", missing)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "tt.ckpt")
    torch.manual_seed(2)
    started = build_run_model("segmentation", missing, init_from=str(tmp_path / "tt.ckpt"))
    for key, value in source.state_dict().items():
        assert torch.equal(started.state_dict()[key], value), key
