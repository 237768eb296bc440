"""A TerraTorch `model_args` block builds unchanged: `build_model(task, **model_args)`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from encdec import PixelWiseModel, build_model

FIXTURE = Path(__file__).parent / "fixtures" / "terratorch_sen1floods11.yaml"


def _model_args() -> dict:
    cfg = yaml.safe_load(FIXTURE.read_text())
    return cfg["model"]["init_args"]["model_args"]


def test_terratorch_block_builds_and_runs() -> None:
    model = build_model("segmentation", **_model_args())
    assert isinstance(model, PixelWiseModel)
    x = torch.randn(2, 6, 64, 64)
    out = model(x).output
    assert out.shape == (2, 2, 64, 64)
    out.mean().backward()
    assert model.head.final.weight.grad is not None
    # TerraTorch's state-dict layout: encoder., neck., decoder., head.
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "neck", "decoder", "head"}


def test_terratorch_300m_block_builds_on_meta() -> None:
    args = _model_args() | {"backbone": "prithvi_eo_v2_300", "necks": [
        {"name": "SelectIndices", "indices": [5, 11, 17, 23]},
        {"name": "ReshapeTokensToImage"},
        {"name": "LearnedInterpolateToPyramidal"},
    ]}
    args.pop("backbone_img_size")
    with torch.device("meta"):
        model = build_model("segmentation", **args)
    out = model(torch.empty(2, 6, 224, 224, device="meta")).output  # batch 2: UperNet's 1x1 pooling has BatchNorm
    assert out.shape == (2, 2, 224, 224)
    n_encoder = sum(p.numel() for p in model.encoder.parameters())
    assert 300e6 <= n_encoder <= 310e6


def test_misspelt_key_in_block_is_named() -> None:
    args = _model_args() | {"backbone_pretrainde": True}
    with pytest.raises((TypeError, ValueError), match="pretrainde"):
        build_model("segmentation", **args)
