"""The external sources: timm backbones and smp decoders through the factory."""

from __future__ import annotations

import pickle

import pytest
import torch

from encdec import BACKBONE_REGISTRY, DECODER_REGISTRY, build_model

TIMM_BACKBONES = ["resnet18", "convnext_atto", "efficientnet_b0", "regnetx_002", "mobilenetv3_small_100"]
SMP_DECODERS = ["Unet", "FPN", "DeepLabV3Plus", "PSPNet", "Linknet", "MAnet", "UnetPlusPlus", "UPerNet", "Segformer"]


@pytest.mark.parametrize("name", TIMM_BACKBONES)
@pytest.mark.parametrize("task", ["segmentation", "regression", "classification"])
def test_timm_backbones_every_task(name: str, task: str) -> None:
    num_classes = None if task == "regression" else 3
    model = build_model(task, f"timm_{name}", "smp_FPN", backbone_in_chans=6, num_classes=num_classes)
    assert model.encoder.out_channels == BACKBONE_REGISTRY["timm"].build(name, in_chans=6).out_channels
    x = torch.randn(2, 6, 64, 64)
    out = model(x).output
    expected = {"segmentation": (2, 3, 64, 64), "regression": (2, 64, 64), "classification": (2, 3)}[task]
    assert tuple(out.shape) == expected
    out.float().mean().backward()
    assert model.encoder.model.conv_stem.weight.grad is not None if hasattr(model.encoder.model, "conv_stem") else True
    assert all(p.grad is not None for p in model.head.parameters())


def test_timm_vit_returns_feature_maps_and_pads_to_patch() -> None:
    enc = BACKBONE_REGISTRY.build("timm_vit_tiny_patch16_224", in_chans=6, img_size=64)
    feats = enc(torch.randn(1, 6, 64, 64))
    assert enc.max_reduction == 16 and [f.shape[1] for f in feats] == enc.out_channels
    assert all(f.shape[-2:] == (4, 4) for f in feats)


def test_timm_bands_set_in_chans_and_mismatch_is_an_error() -> None:
    enc = BACKBONE_REGISTRY.build("timm_resnet18", bands=["BLUE", "GREEN", "RED", "NIR_NARROW"])
    assert enc.model.conv1.in_channels == 4
    with pytest.raises(ValueError, match="bands has 2 entries but in_chans=3"):
        BACKBONE_REGISTRY.build("timm_resnet18", bands=["RED", "NIR_NARROW"], in_chans=3)


@pytest.mark.parametrize("name", SMP_DECODERS)
def test_smp_decoders_on_a_feature_list(name: str) -> None:
    model = build_model("segmentation", "timm_resnet18", f"smp_{name}", backbone_in_chans=6, num_classes=2)
    assert isinstance(model.decoder.out_channels, int)
    out = model(torch.randn(2, 6, 128, 128)).output
    assert out.shape == (2, 2, 128, 128)
    out.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    pickle.loads(pickle.dumps(model))


def test_smp_kwargs_route_as_decoder_prefix() -> None:
    model = build_model(
        "segmentation", "timm_resnet18", "smp_Unet", num_classes=2, decoder_decoder_channels=[64, 32, 16, 8]
    )
    assert model.decoder.out_channels == 8


@pytest.mark.parametrize("use_norm", ["layernorm", {"type": "layernorm", "eps": 1e-5}])
def test_smp_layernorm_decoder_normalises_channels(use_norm: object) -> None:
    # smp 0.6 puts nn.LayerNorm(C) on [B, C, H, W] maps ("expected input with shape [*, C]"); ours fixes that
    model = build_model("segmentation", "timm_resnet18", "smp_Unet", num_classes=2,
                        decoder_decoder_channels=[32, 16, 8, 8], decoder_decoder_use_norm=use_norm)
    norms = [m for m in model.decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m).__name__ == "ChannelLayerNorm" for m in norms)
    out = model(torch.randn(1, 3, 64, 64)).output
    assert out.shape == (1, 2, 64, 64)
    x = torch.randn(2, norms[0].normalized_shape[0], 3, 3)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), norms[0].normalized_shape, norms[0].weight,
                                         norms[0].bias, norms[0].eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(norms[0](x), ref)
    pickle.loads(pickle.dumps(model))


def test_smp_unsupported_and_listing() -> None:
    assert "smp_Unet" in DECODER_REGISTRY.names()
    with pytest.raises(ValueError, match="cannot be built on a feature list"):
        build_model("segmentation", "timm_resnet18", "smp_DPT", num_classes=2)


def test_timm_and_smp_build_on_meta() -> None:
    with torch.device("meta"):
        model = build_model("segmentation", "timm_convnext_atto", "smp_UPerNet", num_classes=2, backbone_in_chans=6)
    assert all(p.is_meta for p in model.parameters())
    model.eval()  # batch-1 pooling branches in BatchNorm need eval mode
    assert model(torch.empty(1, 6, 64, 64, device="meta")).output.shape == (1, 2, 64, 64)
