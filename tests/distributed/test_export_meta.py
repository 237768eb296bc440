"""``export_consolidated`` with a meta-device ``model_factory``: adapters whose merge reads state outside the state
dict (OFT's non-persistent index buffers) still merge exactly, because the materialised copy has its adapters
reset (``encdec.models.peft.reset_adapters``) before the weights are loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from encdec.distributed import make_strategy
from encdec.models import build_model
from encdec.models.export import merge_and_export
from encdec.train.checkpoint import export_consolidated
from encdec.train.optim import build_optimizer

OFT = {"method": "OFT", "replace_qkv": "qkv",
       "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 0, "oft_block_size": 16}}


def _build(peft: bool = True) -> nn.Module:
    return build_model("segmentation", backbone="prithvi_eo_tiny", backbone_pretrained=False, backbone_img_size=32,
                       necks=[{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}],
                       decoder="FCNDecoder", decoder_channels=16, num_classes=3, peft_config=OFT if peft else None)


def _meta_build() -> nn.Module:
    with torch.device("meta"):
        return _build()


def test_meta_factory_export_of_oft_equals_direct_merge(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    net = _build()
    with torch.no_grad():  # trained-looking rotations: the merge then depends on the index buffers
        for name, p in net.named_parameters():
            if "oft_" in name:
                p.normal_(0.0, 0.05)
    strategy = make_strategy("none", device="cpu", optimizer_factory=build_optimizer)
    strategy.setup(net, {"name": "adamw", "lr": 1e-3}, precision="fp32", grad_accum=1, activation_checkpointing=False)
    out = export_consolidated(strategy, tmp_path / "model.safetensors", model_factory=_meta_build)
    assert out is not None
    got = load_file(str(out))
    want = merge_and_export(net)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value.float(), rtol=0, atol=1e-6, msg=key)
    plain = _build(peft=False)
    plain.load_state_dict(got, strict=True)
