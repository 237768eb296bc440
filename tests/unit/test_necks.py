"""Every registered neck: output shapes, channel bookkeeping, gradients, pickling, meta builds, errors."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _tiny_encoders import TinyPyramid, TinyViT, pyramid_maps, vit_maps, vit_tokens
from torch import Tensor

import encdec.models  # noqa: F401  (registers the built-in necks)
from encdec import NECK_REGISTRY, build_model
from encdec.models.necks import Neck
from encdec.registry import UnknownNameError


@dataclass
class NeckCase:
    """One way to call a neck, and what it must return."""

    name: str
    channel_list: list[int]
    features: Callable[[], list[Tensor]]
    expected: list[tuple[int, ...]]
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    channel_dim: int = 1  # where the channel count sits in each output


PYR = [8, 16, 24, 32]
CASES = [
    NeckCase("SelectIndices", PYR, pyramid_maps, [(2, 8, 16, 16), (2, 32, 2, 2), (2, 24, 4, 4)],
             {"indices": [0, -1, 2]}),
    NeckCase("PermuteDims", PYR, lambda: [x.permute(0, 2, 3, 1) for x in pyramid_maps()],
             [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 32, 2, 2)], {"new_order": [0, 3, 1, 2]}),
    NeckCase("InterpolateToPyramidal", [32] * 4, vit_maps, [(2, 32, 64, 64), (2, 32, 32, 32), (2, 32, 16, 16),
                                                            (2, 32, 8, 8)]),
    NeckCase("MaxpoolToPyramidal", [32] * 4, lambda: vit_maps(size=8), [(2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2),
                                                                         (2, 32, 1, 1)]),
    NeckCase("ReshapeTokensToImage", [32] * 4, vit_tokens, [(2, 32, 4, 4)] * 4, image_size=(64, 64)),
    NeckCase("AddBottleneckLayer", PYR, pyramid_maps,
             [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 32, 2, 2), (2, 16, 2, 2)]),
    NeckCase("LearnedInterpolateToPyramidal", [32] * 4, vit_maps,
             [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]),
    NeckCase("AggregateTokens", PYR, lambda: [torch.randn(2, 17, c) for c in PYR], [(2, 16), (2, 32)],
             {"indices": [1, -1], "pooling": "max", "drop_cls": True}, channel_dim=-1),
    NeckCase("FeaturePyramidNetworkNeck", PYR, pyramid_maps, [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4),
                                                              (2, 16, 2, 2)],
             {"out_channel": 16, "output_ordered_dict": False}),
]
CASE_IDS = [c.name for c in CASES]
EXTRA_CASES = [  # variants worth running through the same checks
    NeckCase("ReshapeTokensToImage", [32], lambda: vit_tokens(depth=1, grid=(2, 4)), [(2, 32, 2, 4)],
             image_size=(32, 64)),
    NeckCase("ReshapeTokensToImage", [64], lambda: vit_tokens(depth=1, t=2), [(2, 64, 4, 4)],
             {"effective_time_dim": 2}, image_size=(64, 64)),
    NeckCase("ReshapeTokensToImage", [32], lambda: [torch.randn(2, 12, 32)], [(2, 32, 3, 4)],
             {"remove_cls_token": False, "h": 3}),
    NeckCase("LearnedInterpolateToPyramidal", [32] * 4, vit_maps,
             [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)], {"norm": "group"}),
    NeckCase("AggregateTokens", [32] * 4, vit_tokens, [(2, 32)], {"pooling": "cls"}, channel_dim=-1),
    NeckCase("AggregateTokens", PYR, pyramid_maps, [(2, 24)], {"indices": 2, "pooling": "mean"}, channel_dim=-1),
    NeckCase("SelectIndices", [32] * 4, vit_tokens, [(2, 17, 32)], {"indices": -1}, channel_dim=-1),
]


def _build(case: NeckCase) -> Neck:
    return NECK_REGISTRY.build(case.name, list(case.channel_list), **case.kwargs)


def test_every_registered_neck_has_a_case() -> None:
    assert sorted(NECK_REGISTRY.names()) == sorted(CASE_IDS)
    assert len(NECK_REGISTRY.names()) == 9


def test_fpn_neck_has_terratorch_s_keys_and_refuses_the_ordered_dict_output() -> None:
    neck = NECK_REGISTRY.build("FeaturePyramidNetworkNeck", PYR, out_channel=16, output_ordered_dict=False)
    assert {"fpn.inner_blocks.0.0.weight", "fpn.layer_blocks.3.0.bias"} <= set(neck.state_dict())
    with pytest.raises(ValueError, match=r"output_ordered_dict=True returns an OrderedDict, which no decoder takes"):
        NECK_REGISTRY.build("FeaturePyramidNetworkNeck", PYR, out_channel=16)


@pytest.mark.parametrize("case", CASES + EXTRA_CASES, ids=CASE_IDS + [f"{c.name}-{i}" for i, c in enumerate(EXTRA_CASES)])
def test_neck_shapes_and_channel_list(case: NeckCase) -> None:
    torch.manual_seed(0)
    neck = _build(case)
    assert isinstance(neck, Neck)
    feats = case.features()
    before = list(feats)
    out = neck(feats, image_size=case.image_size)
    assert feats == before, "a neck must not modify the list it is given"
    assert [tuple(o.shape) for o in out] == case.expected
    reported = neck.process_channel_list(list(case.channel_list))
    assert reported == [o.shape[case.channel_dim] for o in out]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_neck_gradients_reach_parameters(case: NeckCase) -> None:
    torch.manual_seed(0)
    neck = _build(case)
    feats = [f.requires_grad_() for f in case.features()]
    out = neck(feats, image_size=case.image_size)
    sum((o * torch.randn_like(o)).sum() for o in out).backward()
    assert any(f.grad is not None and f.grad.abs().sum() > 0 for f in feats), "no gradient reaches the inputs"
    for name, p in neck.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{case.name}.{name} gets no gradient"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_neck_pickles_and_deepcopies(case: NeckCase) -> None:
    torch.manual_seed(0)
    neck = _build(case).eval()
    feats = case.features()
    ref = neck(feats, image_size=case.image_size)
    for clone in (pickle.loads(pickle.dumps(neck)), copy.deepcopy(neck)):
        got = clone(feats, image_size=case.image_size)
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_neck_builds_and_runs_on_meta(case: NeckCase) -> None:
    with torch.device("meta"):
        neck = _build(case)
    assert all(p.is_meta for p in neck.parameters())
    feats = [f.to("meta") for f in case.features()]
    out = neck(feats, image_size=case.image_size)
    assert [tuple(o.shape) for o in out] == case.expected


def test_reshape_tokens_layout_matches_time_major_tokens() -> None:
    # tokens ordered (t, h, w) with D channels -> channels ordered (t, d): TerraTorch's einops layout
    b, t, h, w, d = 1, 2, 2, 3, 4
    tokens = torch.arange(b * t * h * w * d, dtype=torch.float32).reshape(b, t * h * w, d)
    cls = torch.full((b, 1, d), -1.0)
    neck = NECK_REGISTRY.build("ReshapeTokensToImage", [d * t], effective_time_dim=t, h=h)
    (out,) = neck([torch.cat([cls, tokens], dim=1)])
    for ti in range(t):
        for di in range(d):
            for hi in range(h):
                for wi in range(w):
                    assert out[0, ti * d + di, hi, wi] == tokens[0, ti * h * w + hi * w + wi, di]


def test_reshape_tokens_non_square_uses_image_size_and_patch_size() -> None:
    tokens = vit_tokens(depth=1, grid=(3, 5))  # a 48 x 80 input with 16 px patches
    inferred = NECK_REGISTRY.build("ReshapeTokensToImage", [32])
    explicit = NECK_REGISTRY.build("ReshapeTokensToImage", [32], patch_size=16)
    assert inferred(tokens, image_size=(48, 80))[0].shape == (2, 32, 3, 5)
    assert explicit(tokens, image_size=(48, 80))[0].shape == (2, 32, 3, 5)
    tall = vit_tokens(depth=1, grid=(5, 3))
    assert inferred(tall, image_size=(80, 48))[0].shape == (2, 32, 5, 3)


def test_reshape_tokens_errors_name_the_problem() -> None:
    neck = NECK_REGISTRY.build("ReshapeTokensToImage", [32])
    with pytest.raises(ValueError, match=r"cannot arrange 15 tokens per time step into a grid"):
        neck(vit_tokens(depth=1, grid=(3, 5)))  # no image size: 15 is not a square
    with pytest.raises(ValueError, match=r"patch_size=\(16, 16\) gives a 4x4 grid, but the encoder returned 15"):
        NECK_REGISTRY.build("ReshapeTokensToImage", [32], patch_size=16)(vit_tokens(depth=1, grid=(3, 5)), (64, 64))
    with pytest.raises(ValueError, match=r"expects ViT tokens \[B, tokens, D\].*remove this neck"):
        neck(pyramid_maps())
    with pytest.raises(ValueError, match=r"effective_time_dim must be an int >= 1, got 0"):
        NECK_REGISTRY.build("ReshapeTokensToImage", [32], effective_time_dim=0)


def test_select_indices_out_of_range_names_index_and_length() -> None:
    with pytest.raises(ValueError, match=r"SelectIndices: indices entry=4 is out of range for 4 input features.*-4\.\.3"):
        NECK_REGISTRY.build("SelectIndices", PYR, indices=[0, 4])
    with pytest.raises(TypeError, match=r"indices must be an int or a non-empty list"):
        NECK_REGISTRY.build("SelectIndices", PYR, indices=[])


def test_learned_interpolate_needs_exactly_four() -> None:
    with pytest.raises(ValueError, match=r"needs exactly 4 input features, got 3.*SelectIndices"):
        NECK_REGISTRY.build("LearnedInterpolateToPyramidal", [32] * 3)
    with pytest.raises(ValueError, match=r"norm='sync' is not supported"):
        NECK_REGISTRY.build("LearnedInterpolateToPyramidal", [32] * 4, norm="sync")


def test_aggregate_tokens_errors_and_true_channels() -> None:
    with pytest.raises(ValueError, match=r"pooling='median' is not supported"):
        NECK_REGISTRY.build("AggregateTokens", PYR, pooling="median")
    with pytest.raises(ValueError, match=r"drop_cls=True contradicts pooling='cls'"):
        NECK_REGISTRY.build("AggregateTokens", PYR, pooling="cls", drop_cls=True)
    with pytest.raises(ValueError, match=r"pooling='cls' needs tokens"):
        NECK_REGISTRY.build("AggregateTokens", PYR, pooling="cls")(pyramid_maps())
    # the deprecated TerraTorch spelling still works, and the reported channels are the selected ones
    neck = NECK_REGISTRY.build("AggregateTokens", PYR, index=1)
    assert neck.process_channel_list(PYR) == [16]
    tokens = [torch.randn(2, 5, c) for c in PYR]
    assert torch.allclose(neck(tokens)[0], tokens[1].mean(dim=1))
    assert torch.equal(NECK_REGISTRY.build("AggregateTokens", PYR, pooling=2)(tokens)[0], tokens[-1][:, 2])


def test_other_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"new_order=\[0, 1, 1\] is not a permutation"):
        NECK_REGISTRY.build("PermuteDims", PYR, new_order=[0, 1, 1])
    with pytest.raises(ValueError, match=r"new_order=\[0, 2, 1\] has 3 dims but feature 0 has shape \(2, 8, 16, 16\)"):
        NECK_REGISTRY.build("PermuteDims", PYR, new_order=[0, 2, 1])(pyramid_maps())
    with pytest.raises(ValueError, match=r"mode='linear3' is not supported"):
        NECK_REGISTRY.build("InterpolateToPyramidal", PYR, mode="linear3")
    with pytest.raises(ValueError, match=r"feature 3 of size \(4, 4\) is smaller than its pooling kernel 8"):
        NECK_REGISTRY.build("MaxpoolToPyramidal", [32] * 4)(vit_maps(size=4))
    with pytest.raises(ValueError, match=r"feature 0 has shape \(2, 17, 32\).*ReshapeTokensToImage"):
        NECK_REGISTRY.build("InterpolateToPyramidal", [32] * 4)(vit_tokens())
    with pytest.raises(TypeError, match=r"channel_list must be a list of positive ints"):
        NECK_REGISTRY.build("AddBottleneckLayer", 32)
    with pytest.raises(UnknownNameError, match=r"neck 'SelectIndice' is not registered\. Did you mean 'SelectIndices'"):
        NECK_REGISTRY.build("SelectIndice", PYR, indices=[0])


NECK_CHAINS = {
    # a ViT into a pyramid decoder, each of the three pyramid necks
    "vit-learned": (TinyViT, [{"name": "ReshapeTokensToImage"}, {"name": "LearnedInterpolateToPyramidal"}],
                    "UperNetDecoder"),
    "vit-interp": (TinyViT, [{"name": "SelectIndices", "indices": [1, 3]}, {"name": "ReshapeTokensToImage"},
                             {"name": "InterpolateToPyramidal"}], "UNetDecoder"),
    "vit-maxpool": (TinyViT, [{"name": "SelectIndices", "indices": [1, 2, 3]}, {"name": "ReshapeTokensToImage"},
                              {"name": "MaxpoolToPyramidal"}], "UperNetDecoder"),
    "cnn-bottleneck": (TinyPyramid, [{"name": "AddBottleneckLayer"}], "UperNetDecoder"),
    "cnn-permute": (TinyPyramid, [{"name": "PermuteDims", "new_order": [0, 2, 3, 1]},
                                  {"name": "PermuteDims", "new_order": [0, 3, 1, 2]}], "FCNDecoder"),
}


@pytest.mark.parametrize("chain", sorted(NECK_CHAINS))
def test_necks_in_build_model(chain: str) -> None:
    torch.manual_seed(0)
    enc_cls, necks, decoder = NECK_CHAINS[chain]
    kwargs: dict[str, Any] = {"channels": 16} if decoder != "UNetDecoder" else {"channels": [16, 8]}
    if decoder == "FCNDecoder":
        kwargs["num_convs"] = 2
    model = build_model("segmentation", backbone=enc_cls(), decoder=decoder, necks=necks, num_classes=3,
                        decoder_kwargs=kwargs)
    x = torch.randn(2, 3, 64, 64)
    out = model(x).output
    assert out.shape == (2, 3, 64, 64)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_aggregate_tokens_classification_model() -> None:
    model = build_model("classification", backbone=TinyViT(), decoder="IdentityDecoder", num_classes=5,
                        necks=[{"name": "AggregateTokens", "pooling": "mean", "drop_cls": True, "indices": [-1]}])
    assert model.decoder.out_channels == 32
    assert model(torch.randn(2, 3, 32, 48)).output.shape == (2, 5)
