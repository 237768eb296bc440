"""EncoderDecoderFactory semantics: routing, errors, tasks, heads, aux heads, padding, pickling, meta builds."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _tiny_encoders import TinyPyramid
from torch import Tensor, nn

from encdec import AuxiliaryHead, ModelOutput, PixelWiseModel, ScalarOutputModel, build_model
from encdec.models.factory import EncoderDecoderFactory, FactoryError


def PyramidEncoder(in_chans: int = 3, width: int = 8) -> nn.Module:
    """A small CNN pyramid encoder (strides 2, 4, 8) — test data for the factory."""
    return TinyPyramid(in_chans, chans=[width, width * 2, width * 4], strides=[2, 2, 2])


class LastMapDecoder(nn.Module):
    """Decoder test data: a 1x1 conv on the last map."""

    def __init__(self, channel_list: list[int], channels: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channel_list[-1], channels, 1)
        self.out_channels = channels

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.conv(feats[-1])


class HeadedDecoder(LastMapDecoder):
    includes_head = True

    def __init__(self, channel_list: list[int], num_classes: int) -> None:
        super().__init__(channel_list, num_classes)


def _seg(**kw: object) -> nn.Module:
    return build_model("segmentation", backbone=PyramidEncoder(), decoder=LastMapDecoder([8, 16, 32]), num_classes=3, **kw)


@pytest.mark.parametrize(
    ("task", "expected_cls", "shape"),
    [
        ("segmentation", PixelWiseModel, (2, 3, 32, 32)),
        ("regression", PixelWiseModel, (2, 32, 32)),
        ("classification", ScalarOutputModel, (2, 3)),
        ("scalar_regression", ScalarOutputModel, (2,)),
    ],
)
def test_tasks_output_shapes_and_grads(task: str, expected_cls: type, shape: tuple[int, ...]) -> None:
    num_classes = None if task in ("regression", "scalar_regression") else 3
    model = build_model(task, backbone=PyramidEncoder(), decoder=LastMapDecoder([8, 16, 32]), num_classes=num_classes)
    assert isinstance(model, expected_cls)
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, ModelOutput) and tuple(out.output.shape) == shape
    out.output.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    for name in ("encoder", "neck", "decoder", "head", "aux_heads"):
        assert hasattr(model, name)
    assert all(k.split(".")[0] in {"encoder", "decoder", "head"} for k in model.state_dict())


def test_prefix_routing_merges_with_explicit_dicts() -> None:
    model = build_model(
        "segmentation",
        backbone="timm_resnet18",
        backbone_in_chans=6,
        backbone_kwargs={"out_indices": [1, 2, 3, 4]},
        decoder="smp_FPN",
        decoder_decoder_dropout=0.0,
        head_dropout=0.1,
        num_classes=2,
    )
    assert model.encoder.model.conv1.in_channels == 6 and len(model.encoder.out_channels) == 4
    assert type(model.head.dropout) is nn.Dropout  # element-wise, as TerraTorch


def test_unused_kwargs_are_named() -> None:
    with pytest.raises(FactoryError, match=r"unused arguments \['colour', 'weights'\]"):
        _seg(colour="red", weights=1)


def test_key_given_twice_is_an_error() -> None:
    with pytest.raises(FactoryError, match="'in_chans' is given twice for the backbone"):
        build_model("segmentation", "timm_resnet18", "smp_FPN", num_classes=2, backbone_in_chans=6, backbone_kwargs={"in_chans": 4})


def test_unknown_task() -> None:
    with pytest.raises(FactoryError, match=r"task 'segmentaton' is not supported; use one of segmentation, regression"):
        build_model("segmentaton", PyramidEncoder(), LastMapDecoder([8, 16, 32]))


def test_missing_num_classes() -> None:
    with pytest.raises(FactoryError, match="task 'segmentation' needs num_classes"):
        build_model("segmentation", PyramidEncoder(), LastMapDecoder([8, 16, 32]))
    with pytest.raises(FactoryError, match="includes its head and needs num_classes"):
        build_model("segmentation", PyramidEncoder(), "LinearDecoder")


def test_unknown_backbone_and_decoder_suggest() -> None:
    with pytest.raises(KeyError, match="Did you mean 'timm_resnet18'"):
        build_model("segmentation", "timm_resnt18", "smp_FPN", num_classes=2)
    with pytest.raises(KeyError, match="Did you mean 'smp_FPN'"):
        build_model("segmentation", "timm_resnet18", "smp_FPM", num_classes=2)


def test_constructor_type_error_surfaces_unchanged() -> None:
    with pytest.raises(TypeError, match="got unexpected arguments \\['bogus'\\]"):
        build_model("segmentation", "timm_resnet18", "smp_FPN", num_classes=2, decoder_bogus=1)


def test_includes_head_on_instance_and_class() -> None:
    model = build_model("segmentation", PyramidEncoder(), HeadedDecoder([8, 16, 32], 5), num_classes=5)
    assert isinstance(model.head, nn.Identity)
    assert model(torch.randn(1, 3, 16, 16)).output.shape == (1, 5, 16, 16)
    with pytest.raises(FactoryError, match="includes its own head"):
        build_model("segmentation", PyramidEncoder(), HeadedDecoder([8, 16, 32], 5), num_classes=5, head_dropout=0.1)


def test_bad_encoder_contract() -> None:
    with pytest.raises(FactoryError, match="has no `out_channels: list\\[int\\]`"):
        build_model("segmentation", nn.Conv2d(3, 3, 1), LastMapDecoder([3]), num_classes=2)


def test_padding_to_patch_multiple_and_crop_back() -> None:
    model = _seg()
    out = model(torch.randn(1, 3, 37, 45)).output
    assert out.shape == (1, 3, 37, 45)
    out5d = build_model("regression", PyramidEncoder(in_chans=3), LastMapDecoder([8, 16, 32]))
    assert out5d(torch.randn(2, 3, 21, 30)).output.shape == (2, 21, 30)


def test_rescale_false_keeps_decoder_resolution() -> None:
    out = _seg(rescale=False)(torch.randn(1, 3, 32, 32)).output
    assert out.shape == (1, 3, 4, 4)


def test_aux_heads_get_their_own_head_args() -> None:
    aux = [
        AuxiliaryHead("deep", "smp_FPN", {"decoder_decoder_dropout": 0.0, "head_dropout": 0.3, "head_channel_list": [8]}),
        {"name": "plain", "decoder": "smp_FPN"},
    ]
    model = build_model("segmentation", "timm_resnet18", "smp_FPN", num_classes=4, aux_decoders=aux)
    assert set(model.aux_heads) == {"deep", "plain"}
    deep_head = model.aux_heads["deep"].head
    assert type(deep_head.dropout) is nn.Dropout and deep_head.dropout.p == 0.3 and len(deep_head.hidden) == 3
    out = model(torch.randn(1, 3, 64, 64))
    assert out.output.shape == (1, 4, 64, 64)
    assert {k: tuple(v.shape) for k, v in out.auxiliary_heads.items()} == {"deep": (1, 4, 64, 64), "plain": (1, 4, 64, 64)}
    with pytest.raises(FactoryError, match="used twice"):
        build_model("segmentation", "timm_resnet18", "smp_FPN", num_classes=4, aux_decoders=[aux[1], aux[1]])


def test_pickle_deepcopy_and_meta_build() -> None:
    model = build_model("segmentation", "timm_resnet18", "smp_Unet", num_classes=2, backbone_in_chans=6)
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(1, 6, 64, 64)
    model.eval(), clone.eval()
    torch.testing.assert_close(model(x).output, clone(x).output)
    assert isinstance(copy.deepcopy(model), PixelWiseModel)
    with torch.device("meta"):
        meta = build_model("segmentation", "timm_resnet18", "smp_Unet", num_classes=2, backbone_in_chans=6)
    assert all(p.is_meta for p in meta.parameters())
    assert meta(torch.empty(1, 6, 64, 64, device="meta")).output.shape == (1, 2, 64, 64)


def test_factory_class_entry_point() -> None:
    model = EncoderDecoderFactory().build_model("classification", PyramidEncoder(), LastMapDecoder([8, 16, 32]), num_classes=7)
    assert model(torch.randn(3, 3, 16, 16)).output.shape == (3, 7)
