"""Prithvi backbones through the factory: the seed's segmentation example (SelectIndices, ReshapeTokensToImage,
LearnedInterpolateToPyramidal, UperNetDecoder), ``_tl`` coordinates through the model's forward, and the engine's
meta path (build on meta, ``to_empty``, ``load_pretrained``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from encdec.models import build_model
from encdec.models.backbones.prithvi import PrithviViT, build_prithvi, load_pretrained


def _necks(indices: list[int]) -> list[dict[str, object]]:
    return [
        {"name": "SelectIndices", "indices": indices},
        {"name": "ReshapeTokensToImage"},
        {"name": "LearnedInterpolateToPyramidal"},
    ]


def test_issue_example_300m_on_meta() -> None:
    with torch.device("meta"):
        model = build_model(
            "segmentation",
            backbone="prithvi_eo_v2_300",
            backbone_bands=["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"],
            necks=_necks([5, 11, 17, 23]),
            decoder="UperNetDecoder",
            num_classes=2,
        )
        out = model(torch.empty(2, 6, 224, 224))
    assert isinstance(model.encoder, PrithviViT)
    assert tuple(out.output.shape) == (2, 2, 224, 224)
    units = model.sharding_units()
    assert len(units) == 25 and units[0] is model.encoder.blocks[0] and units[-1] is model.decoder


def test_tiny_segmentation_forward_backward_with_padding() -> None:
    torch.manual_seed(0)
    model = build_model(
        "segmentation",
        backbone="prithvi_eo_tiny",
        backbone_img_size=64,
        necks=_necks([0, 1, 2, 3]),
        decoder="UperNetDecoder",
        decoder_channels=32,
        num_classes=2,
    )
    out = model(torch.randn(2, 6, 64, 64)).output
    assert tuple(out.shape) == (2, 2, 64, 64)
    out.mean().backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    # 60 is not a multiple of the 16-pixel patch: padded to 64 inside, cropped back outside
    assert tuple(model(torch.randn(2, 6, 60, 60)).output.shape) == (2, 2, 60, 60)


def test_tl_coordinates_through_the_model_forward() -> None:
    torch.manual_seed(0)
    model = build_model(
        "segmentation",
        backbone="prithvi_eo_v2_tiny_tl",
        backbone_img_size=32,
        backbone_num_frames=2,
        necks=[*_necks([2, 5, 8, 11])[:1], {"name": "ReshapeTokensToImage", "effective_time_dim": 2},
               {"name": "LearnedInterpolateToPyramidal"}],
        decoder="UperNetDecoder",
        decoder_channels=32,
        num_classes=3,
    ).eval()
    x = torch.randn(2, 6, 2, 32, 32)
    coords = {
        "temporal_coords": torch.tensor([[[2019.0, 120.0], [2019.0, 240.0]]] * 2),
        "location_coords": torch.tensor([[-3.1, 15.0], [45.0, 7.5]]),
    }
    with torch.no_grad():
        plain = model(x).output
        with_coords = model(x, **coords).output
    assert tuple(with_coords.shape) == (2, 3, 32, 32)
    assert not torch.allclose(plain, with_coords, atol=1e-5)


def test_meta_model_to_empty_then_load_pretrained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_prithvi("prithvi_eo_tiny", img_size=64)
    ckpt = tmp_path / "enc.pt"
    torch.save({"encoder." + k: v for k, v in src.state_dict().items()}, ckpt)
    kwargs = {
        "backbone": "prithvi_eo_tiny",
        "backbone_pretrained": True,
        "backbone_ckpt_path": str(ckpt),
        "backbone_img_size": 64,
        "necks": _necks([0, 1, 2, 3]),
        "decoder": "UperNetDecoder",
        "decoder_channels": 32,
        "num_classes": 2,
    }
    with torch.device("meta"):
        model = build_model("segmentation", **kwargs)
    model.to_empty(device="cpu")
    assert load_pretrained(model) == [f"encoder <- {ckpt}"]
    for k, v in src.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    assert torch.equal(model.encoder.pos_embed, src.pos_embed)
    assert load_pretrained(model) == []


def test_wrong_band_count_is_reported_by_the_encoder() -> None:
    model = build_model("segmentation", backbone="prithvi_eo_tiny", backbone_img_size=32,
                        necks=_necks([0, 1, 2, 3]), decoder="UperNetDecoder", decoder_channels=16, num_classes=2)
    with pytest.raises(ValueError, match="built for 6 bands"):
        model(torch.randn(2, 4, 32, 32))
