"""Every built-in decoder: output shapes, ``out_channels``, gradients, pickling, meta builds, errors, and each
task through ``build_model``."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _tiny_encoders import TinyPyramid, TinyViT, pyramid_maps, vit_maps, vit_tokens
from torch import Tensor, nn

import encdec.models  # noqa: F401  (registers the built-in decoders)
from encdec import DECODER_REGISTRY, build_model
from encdec.models.decoders.linear import LinearDecoder
from encdec.models.factory import FactoryError

BUILTIN = DECODER_REGISTRY["encdec"]
PYR = [8, 16, 24, 32]


@dataclass
class DecoderCase:
    name: str
    channel_list: list[int]
    features: Callable[[], list[Tensor]]
    expected: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


CASES = [
    DecoderCase("FCNDecoder", [32] * 4, vit_maps, (2, 16, 16, 16), {"channels": 16, "num_convs": 2}),
    DecoderCase("UperNetDecoder", PYR, pyramid_maps, (2, 16, 16, 16), {"channels": 16}),
    DecoderCase("UNetDecoder", PYR, pyramid_maps, (2, 8, 16, 16), {"channels": [32, 24, 16, 8]}),
    DecoderCase("IdentityDecoder", PYR, pyramid_maps, (2, 32, 2, 2)),
    DecoderCase("LinearDecoder", [32] * 4, vit_maps, (2, 3, 16, 16), {"num_classes": 3, "upsampling_size": 4}),
]
CASE_IDS = [c.name for c in CASES]
EXTRA_CASES = [
    DecoderCase("UperNetDecoder", [32] * 4, vit_maps, (2, 16, 16, 16), {"channels": 16, "scale_modules": True}),
    DecoderCase("UperNetDecoder", PYR, pyramid_maps, (2, 16, 16, 16),
                {"channels": 16, "norm": "group", "pool_scales": [1, 3], "align_corners": False}),
    DecoderCase("UperNetDecoder", [32], lambda: vit_maps(depth=1), (2, 16, 4, 4), {"channels": 16, "norm": "none"}),
    DecoderCase("FCNDecoder", PYR, pyramid_maps, (2, 8, 32, 32),
                {"channels": 8, "num_convs": 1, "in_index": 0, "norm": "layer"}),
    DecoderCase("UNetDecoder", PYR[:2], lambda: pyramid_maps(chans=(8, 16)), (2, 4, 16, 16),
                {"channels": [8, 4], "norm": "frozen_batch"}),
    DecoderCase("IdentityDecoder", [32] * 4, vit_tokens, (2, 17, 32), {"out_index": 0}),
]
EXTRA_IDS = [f"{c.name}-{i}" for i, c in enumerate(EXTRA_CASES)]


def _build(case: DecoderCase) -> nn.Module:
    return DECODER_REGISTRY.build(case.name, list(case.channel_list), **case.kwargs)


def test_every_builtin_decoder_has_a_case() -> None:
    assert sorted(BUILTIN.names()) == sorted(CASE_IDS)


@pytest.mark.parametrize("case", CASES + EXTRA_CASES, ids=CASE_IDS + EXTRA_IDS)
def test_decoder_shape_and_out_channels(case: DecoderCase) -> None:
    torch.manual_seed(0)
    decoder = _build(case)
    out = decoder(case.features())
    assert tuple(out.shape) == case.expected
    channel_dim = 1 if out.dim() == 4 else -1
    assert decoder.out_channels == out.shape[channel_dim]
    assert isinstance(decoder.out_channels, int)


@pytest.mark.parametrize("case", CASES + EXTRA_CASES[:2], ids=CASE_IDS + EXTRA_IDS[:2])
def test_decoder_gradients_reach_every_parameter(case: DecoderCase) -> None:
    torch.manual_seed(0)
    decoder = _build(case)
    feats = [f.requires_grad_() for f in case.features()]
    out = decoder(feats)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{case.name}.{name} gets no gradient"
    assert feats[-1].grad is not None or feats[0].grad is not None


@pytest.mark.parametrize("case", CASES + EXTRA_CASES[:1], ids=CASE_IDS + EXTRA_IDS[:1])
def test_decoder_pickles_deepcopies_and_builds_on_meta(case: DecoderCase) -> None:
    torch.manual_seed(0)
    decoder = _build(case).eval()
    feats = case.features()
    ref = decoder(feats)
    for clone in (pickle.loads(pickle.dumps(decoder)), copy.deepcopy(decoder)):
        assert torch.equal(clone(feats), ref)
    with torch.device("meta"):
        meta = _build(case)
    assert all(p.is_meta for p in meta.parameters())
    assert tuple(meta([f.to("meta") for f in feats]).shape) == case.expected


def test_registry_metadata() -> None:
    assert DECODER_REGISTRY.metadata("LinearDecoder")["includes_head"] is True
    assert LinearDecoder.includes_head is True
    for name in ("FCNDecoder", "UperNetDecoder", "UNetDecoder", "IdentityDecoder"):
        assert not DECODER_REGISTRY.metadata(name).get("includes_head", False)
        assert DECODER_REGISTRY.metadata(name)["levels"] in ("one", "pyramid")


def test_upernet_keys_follow_terratorch() -> None:
    keys = set(DECODER_REGISTRY.build("UperNetDecoder", [32] * 4, channels=8, scale_modules=True).state_dict())
    for key in ("fpn1.0.weight", "fpn1.1.running_mean", "fpn1.3.weight", "fpn2.0.weight",
                "psp_modules.0.1.conv.weight", "psp_modules.3.1.norm.weight", "bottleneck.conv.weight",
                "lateral_convs.2.conv.weight", "fpn_convs.0.norm.running_var", "fpn_bottleneck.conv.weight"):
        assert key in keys, key


def test_decoder_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"FCNDecoder: num_convs must be an int >= 1, got 0"):
        DECODER_REGISTRY.build("FCNDecoder", PYR, num_convs=0)
    with pytest.raises(ValueError, match=r"FCNDecoder: in_index=4 is out of range for 4 input features"):
        DECODER_REGISTRY.build("FCNDecoder", PYR, in_index=4)
    with pytest.raises(ValueError, match=r"FCNDecoder: norm='bn' is not supported; use one of batch"):
        DECODER_REGISTRY.build("FCNDecoder", PYR, norm="bn")
    with pytest.raises(ValueError, match=r"scale_modules=True needs exactly 4 features, got 3.*SelectIndices"):
        DECODER_REGISTRY.build("UperNetDecoder", [32] * 3, scale_modules=True)
    with pytest.raises(ValueError, match=r"pool_scales must be a non-empty list of ints >= 1, got \(\)"):
        DECODER_REGISTRY.build("UperNetDecoder", PYR, pool_scales=())
    with pytest.raises(ValueError, match=r"UperNetDecoder was built for 4 features but received 3"):
        DECODER_REGISTRY.build("UperNetDecoder", PYR, channels=8)(pyramid_maps()[:3])
    with pytest.raises(ValueError, match=r"UNetDecoder: channels has 2 entries but there are 4 input features"):
        DECODER_REGISTRY.build("UNetDecoder", PYR, channels=[16, 8])
    with pytest.raises(TypeError, match=r"UNetDecoder: channels must be a list of positive ints"):
        DECODER_REGISTRY.build("UNetDecoder", PYR, channels=16)
    with pytest.raises(ValueError, match=r"IdentityDecoder: out_index=-5 is out of range for 4 input features"):
        DECODER_REGISTRY.build("IdentityDecoder", PYR, out_index=-5)
    with pytest.raises(ValueError, match=r"LinearDecoder: num_classes must be an int >= 1, got 0 \(out of range\); fix: "):
        DECODER_REGISTRY.build("LinearDecoder", PYR, num_classes=0)


@pytest.mark.parametrize("name", ["FCNDecoder", "UperNetDecoder", "UNetDecoder", "LinearDecoder"])
def test_tokens_given_to_a_map_decoder_suggest_the_neck(name: str) -> None:
    kwargs = {"UNetDecoder": {"channels": [8] * 4}, "LinearDecoder": {"num_classes": 2}}.get(name, {"channels": 8})
    decoder = DECODER_REGISTRY.build(name, [32] * 4, **kwargs)
    with pytest.raises(ValueError, match=r"expects \[B, C, H, W\] feature maps, but feature -?\d has shape "
                                         r"\(2, 17, 32\)\. .*'ReshapeTokensToImage'"):
        decoder(vit_tokens())


RESHAPE = [{"name": "ReshapeTokensToImage"}]
MODEL_CASES: dict[str, tuple[type[nn.Module], list[dict[str, Any]] | None, dict[str, Any]]] = {
    "FCNDecoder": (TinyViT, RESHAPE, {"channels": 16, "num_convs": 2}),
    "UperNetDecoder": (TinyPyramid, None, {"channels": 16}),
    "UNetDecoder": (TinyPyramid, None, {"channels": [32, 24, 16, 8]}),
    "IdentityDecoder": (TinyPyramid, None, {}),
    "LinearDecoder": (TinyViT, RESHAPE, {"upsampling_size": 16}),
}
TASKS = {"segmentation": (3, (2, 3, 64, 64)), "regression": (1, (2, 64, 64)), "classification": (4, (2, 4))}
MODEL_PARAMS = [
    (d, t) for d in sorted(MODEL_CASES) for t in TASKS if not (d == "LinearDecoder" and t == "classification")
]


def test_model_cases_cover_every_builtin_decoder() -> None:
    assert sorted(MODEL_CASES) == sorted(BUILTIN.names())


def _model(decoder: str, task: str) -> nn.Module:
    enc_cls, necks, kwargs = MODEL_CASES[decoder]
    num_classes, _ = TASKS[task]
    return build_model(task, backbone=enc_cls(), decoder=decoder, necks=necks, num_classes=num_classes,
                       decoder_kwargs=dict(kwargs))


@pytest.mark.parametrize(("decoder", "task"), MODEL_PARAMS)
def test_decoder_in_build_model(decoder: str, task: str) -> None:
    torch.manual_seed(0)
    model = _model(decoder, task)
    out = model(torch.randn(2, 3, 64, 64)).output
    assert tuple(out.shape) == TASKS[task][1]
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient for {missing}"
    if decoder == "LinearDecoder":
        assert isinstance(model.head, nn.Identity)


@pytest.mark.parametrize("decoder", sorted(MODEL_CASES))
def test_built_model_pickles_and_builds_on_meta(decoder: str) -> None:
    torch.manual_seed(0)
    model = _model(decoder, "segmentation").eval()
    x = torch.randn(1, 3, 64, 64)
    ref = model(x).output
    assert torch.equal(pickle.loads(pickle.dumps(model))(x).output, ref)
    assert torch.equal(copy.deepcopy(model)(x).output, ref)
    with torch.device("meta"):
        meta = _model(decoder, "segmentation")
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in model.parameters())


def test_linear_decoder_as_module_and_without_num_classes() -> None:
    model = build_model("segmentation", backbone=TinyViT(), decoder=LinearDecoder([32] * 4, num_classes=3),
                        necks=RESHAPE)
    assert isinstance(model.head, nn.Identity)
    assert model(torch.randn(1, 3, 32, 32)).output.shape == (1, 3, 32, 32)
    with pytest.raises(FactoryError, match=r"'LinearDecoder' includes its head and needs num_classes"):
        build_model("segmentation", backbone=TinyViT(), decoder="LinearDecoder", necks=RESHAPE)


def test_vit_upernet_with_scale_modules_in_build_model() -> None:
    model = build_model("segmentation", backbone=TinyViT(embed_dim=16), decoder="UperNetDecoder", num_classes=2,
                        necks=[{"name": "ReshapeTokensToImage"}], decoder_channels=8, decoder_scale_modules=True,
                        decoder_norm="group")
    assert model(torch.randn(2, 3, 48, 64)).output.shape == (2, 2, 48, 64)


@pytest.mark.parametrize(("channels", "groups"), [(256, 32), (64, 16), (48, 12), (16, 4), (12, 3), (6, 1), (2, 1)])
def test_group_norm_keeps_at_least_four_channels_per_group(channels: int, groups: int) -> None:
    from encdec.models.norms import make_norm2d

    norm = make_norm2d("group", channels)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == groups


@pytest.mark.parametrize("norm", ["group", "layer", "frozen_batch", "none"])
def test_upernet_trains_at_micro_batch_one(norm: str) -> None:
    # the PPM's 1x1 pooled map at batch 1 leaves one value per channel: per-channel groups would output zeros
    torch.manual_seed(0)
    dec = DECODER_REGISTRY.build("UperNetDecoder", PYR, channels=16, norm=norm).train()
    feats = [f[:1] for f in pyramid_maps()]
    out = dec(feats)
    assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all()
    out.square().mean().backward()
    branch = dec.psp_modules[0][1].conv.weight.grad
    assert branch is not None and branch.abs().sum() > 0


def test_conv_bias_only_where_no_norm_absorbs_it() -> None:
    for norm, bias in (("batch", False), ("group", False), ("layer", False), ("frozen_batch", True), ("none", True)):
        dec = DECODER_REGISTRY.build("UperNetDecoder", PYR, channels=16, norm=norm)
        assert (dec.bottleneck.conv.bias is not None) is bias, norm
    # TerraTorch's learned pyramid keeps the bias of its first transposed conv (checkpoint key fpn1.0.bias)
    dec = DECODER_REGISTRY.build("UperNetDecoder", [32] * 4, channels=8, scale_modules=True)
    assert dec.fpn1[0].bias is not None


def test_fcn_default_norm_matches_terratorch() -> None:
    dec = DECODER_REGISTRY.build("FCNDecoder", [32] * 4, channels=8, num_convs=2)
    keys = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert keys == {
        "convs.0.0.weight": (32, 8, 2, 2), "convs.0.0.bias": (8,), "convs.0.1.weight": (8, 8, 3, 3),
        "convs.0.1.bias": (8,), "convs.0.2.ln.weight": (8,), "convs.0.2.ln.bias": (8,),
        "convs.1.0.weight": (8, 8, 2, 2), "convs.1.0.bias": (8,), "convs.1.1.weight": (8, 8, 3, 3),
        "convs.1.1.bias": (8,), "convs.1.2.ln.weight": (8,), "convs.1.2.ln.bias": (8,),
    }
    assert dec.convs[0][2].ln.eps == 1e-6
    x = torch.randn(2, 8, 3, 3)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(dec.convs[0][2](x), ref)
