"""Prithvi-EO-2.0 encoders: registry metadata, meta builds of every variant, tiny variants for real."""

from __future__ import annotations

import copy
import math
import pickle
import time

import pytest
import torch

from encdec.models.backbones.prithvi import VARIANTS, PrithviViT, build_prithvi
from encdec.models.backbones.prithvi_bands import DEFAULT_BANDS, normalize_bands
from encdec.models.backbones.prithvi_layers import DropPath
from encdec.models.backbones.prithvi_pos import sincos_3d_pos_embed
from encdec.registry import BACKBONE_REGISTRY

ALL = list(VARIANTS)
EXPECTED = {  # (embed dim, depth, heads, patch) from REFERENCE.md
    "prithvi_eo_tiny": (256, 4, 4, (1, 16, 16)),
    "prithvi_eo_v2_tiny_tl": (192, 12, 3, (1, 16, 16)),
    "prithvi_eo_v2_100_tl": (768, 12, 12, (1, 16, 16)),
    "prithvi_eo_v2_300": (1024, 24, 16, (1, 16, 16)),
    "prithvi_eo_v2_300_tl": (1024, 24, 16, (1, 16, 16)),
    "prithvi_eo_v2_600": (1280, 32, 16, (1, 14, 14)),
    "prithvi_eo_v2_600_tl": (1280, 32, 16, (1, 14, 14)),
}


def _coords(b: int, t: int) -> dict[str, torch.Tensor]:
    return {
        "temporal_coords": torch.tensor([[2020.0 + i, 30.0 * (i + 1)] for i in range(t)]).expand(b, t, 2).clone(),
        "location_coords": torch.tensor([[38.5, -121.7]]).expand(b, 2).clone(),
    }


def test_all_variants_registered_with_metadata() -> None:
    assert set(EXPECTED) == set(ALL)
    for name, (dim, depth, heads, patch) in EXPECTED.items():
        meta = BACKBONE_REGISTRY.metadata(name)
        assert (meta["embed_dim"], meta["depth"], meta["num_heads"], meta["patch_size"]) == (dim, depth, heads, patch)
        assert meta["fused_qkv"] == "attn.qkv"
        assert list(meta["bands"]) == ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
        assert meta["img_size"] == 224
        assert meta["coords"] == (("time", "location") if name.endswith("_tl") else ())
    assert 300e6 <= BACKBONE_REGISTRY.metadata("prithvi_eo_v2_300")["num_params"] <= 310e6
    assert BACKBONE_REGISTRY.metadata("prithvi_eo_v2_300")["hf_repo"] == "ibm-nasa-geospatial/Prithvi-EO-2.0-300M"
    assert BACKBONE_REGISTRY.metadata("prithvi_eo_v2_300")["hf_filename"] == "Prithvi_EO_V2_300M.pt"


@pytest.mark.parametrize("name", ALL)
def test_meta_build_shapes_and_param_count(name: str) -> None:
    dim, depth, _, patch = EXPECTED[name]
    with torch.device("meta"):
        enc = BACKBONE_REGISTRY.build(name)
    assert isinstance(enc, PrithviViT)
    assert all(p.is_meta for p in enc.parameters())
    assert sum(p.numel() for p in enc.parameters()) == BACKBONE_REGISTRY.metadata(name)["num_params"]
    fused = enc.blocks[0].attn.qkv
    assert isinstance(fused, torch.nn.Linear) and tuple(fused.weight.shape) == (3 * dim, dim)
    assert isinstance(enc.blocks, torch.nn.ModuleList) and len(enc.blocks) == depth
    assert enc.out_channels == [dim] * depth and enc.patch_size == patch and enc.embed_dim == dim
    kwargs = _coords(2, 1) if name.endswith("_tl") else {}
    outs = enc(torch.empty(2, 6, 224, 224, device="meta"), **{k: v.to("meta") for k, v in kwargs.items()})
    n = (224 // patch[1]) ** 2
    assert len(outs) == depth and all(tuple(o.shape) == (2, 1 + n, dim) for o in outs)


def test_300m_param_count_and_600m_meta_build_is_fast() -> None:
    with torch.device("meta"):
        enc300 = BACKBONE_REGISTRY.build("prithvi_eo_v2_300")
    assert 300_000_000 <= sum(p.numel() for p in enc300.parameters()) <= 310_000_000
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.device("meta"):
            enc = BACKBONE_REGISTRY.build("prithvi_eo_v2_600")
        times.append(time.perf_counter() - start)
    assert min(times) < 1.0, times
    assert all(t.device.type == "meta" for t in [*enc.parameters(), *enc.buffers()])


def test_tiny_forward_backward() -> None:
    torch.manual_seed(0)
    enc = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=64)
    x = torch.randn(2, 6, 64, 64)
    outs = enc(x)
    assert [tuple(o.shape) for o in outs] == [(2, 17, 256)] * 4
    # the last output is after the final LayerNorm: zero mean, unit variance per token (norm weight 1, bias 0)
    assert outs[-1].mean(-1).abs().max() < 1e-4 and (outs[-1].var(-1, unbiased=False) - 1).abs().max() < 1e-3
    assert not torch.allclose(outs[-2].mean(-1), torch.zeros(2, 17), atol=1e-3)
    sum(o.pow(2).mean() for o in outs).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0 and enc.cls_token.grad.abs().sum() > 0
    # 4D and 5D (T=1) inputs are the same thing
    with torch.no_grad():
        assert torch.equal(enc(x)[-1], enc(x.unsqueeze(2))[-1])


def test_position_embedding_values() -> None:
    pe = sincos_3d_pos_embed(32, (2, 3, 4))
    assert pe.shape == (1, 1 + 24, 32) and torch.equal(pe[0, 0], torch.zeros(32))
    w_dim, h_dim = 12, 12
    # token (t=1, h=2, w=3): the width part encodes 3, the height part 2, the time part 1
    tok = pe[0, 1 + (1 * 3 + 2) * 4 + 3]
    for i in range(w_dim // 2):
        omega = 1.0 / 10000 ** (i / (w_dim / 2))
        assert math.isclose(tok[i].item(), math.sin(3 * omega), abs_tol=1e-6)
        assert math.isclose(tok[w_dim // 2 + i].item(), math.cos(3 * omega), abs_tol=1e-6)
        assert math.isclose(tok[w_dim + i].item(), math.sin(2 * omega), abs_tol=1e-6)
    for i in range(4):
        omega = 1.0 / 10000 ** (i / 4)
        assert math.isclose(tok[w_dim + h_dim + i].item(), math.sin(1 * omega), abs_tol=1e-6)


def test_num_frames_3_and_non_224_img_size() -> None:
    torch.manual_seed(0)
    enc = BACKBONE_REGISTRY.build("prithvi_eo_tiny", num_frames=3, img_size=(64, 48))
    assert enc.out_channels == [256 * 3] * 4
    assert tuple(enc.pos_embed.shape) == (1, 1 + 3 * 4 * 3, 256)
    assert torch.equal(enc.pos_embed, sincos_3d_pos_embed(256, (3, 4, 3)))
    outs = enc(torch.randn(1, 6, 3, 64, 48))
    assert [tuple(o.shape) for o in outs] == [(1, 1 + 36, 256)] * 4
    # another size at run time: position embedding interpolated
    assert tuple(enc(torch.randn(1, 6, 3, 32, 32))[-1].shape) == (1, 1 + 3 * 4, 256)
    with pytest.raises(ValueError, match="num_frames=3"):
        enc(torch.randn(1, 6, 64, 48))


def test_input_errors() -> None:
    enc = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32)
    with pytest.raises(ValueError, match=r"4 channels .* 6 bands"):
        enc(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        enc(torch.randn(1, 6, 40, 32))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        enc(torch.randn(6, 32, 32))


def test_tl_coordinates() -> None:
    torch.manual_seed(0)
    enc = BACKBONE_REGISTRY.build("prithvi_eo_v2_tiny_tl", img_size=32).eval()
    assert enc.temporal_embed_enc.scale.item() == pytest.approx(0.1)
    assert enc.location_embed_enc.scale.item() == pytest.approx(0.1)
    x = torch.randn(2, 6, 32, 32)
    c = _coords(2, 1)
    plain, with_coords = enc(x)[-1], enc(x, **c)[-1]
    assert not torch.allclose(plain, with_coords, atol=1e-4)
    other_year = {**c, "temporal_coords": c["temporal_coords"] + torch.tensor([1.0, 0.0])}
    assert not torch.allclose(with_coords, enc(x, **other_year)[-1], atol=1e-5)
    only_loc = enc(x, location_coords=c["location_coords"])[-1]
    assert not torch.allclose(only_loc, plain, atol=1e-4) and not torch.allclose(only_loc, with_coords, atol=1e-4)
    enc.train()
    enc(x, **c)[-1].sum().backward()
    assert enc.temporal_embed_enc.scale.grad.abs().item() > 0 and enc.location_embed_enc.scale.grad.abs().item() > 0
    with pytest.raises(ValueError, match="temporal_coords must be"):
        enc(x, temporal_coords=torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="location_coords must be"):
        enc(x, location_coords=torch.zeros(2, 3))
    # three frames: one (year, day) per frame
    enc3 = BACKBONE_REGISTRY.build("prithvi_eo_v2_tiny_tl", img_size=32, num_frames=3)
    assert tuple(enc3(torch.randn(2, 6, 3, 32, 32), **_coords(2, 3))[-1].shape) == (2, 1 + 12, 192)
    # variants without coordinate encoders ignore them, as TerraTorch does
    tiny = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32).eval()
    assert torch.equal(tiny(x)[-1], tiny(x, **c)[-1])


def test_bands_subset_and_extension_shapes() -> None:
    enc = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32, bands=["red", "GREEN", "BLUE"])
    assert enc.bands == ["RED", "GREEN", "BLUE"] and enc.patch_embed.proj.weight.shape[1] == 3
    assert tuple(enc(torch.randn(1, 3, 32, 32))[-1].shape) == (1, 5, 256)
    ext = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32, bands=[*DEFAULT_BANDS, "COASTAL_AEROSOL", 7, (10, 11)])
    assert ext.in_chans == 10 and ext.bands[-3:] == [7, 10, 11]
    assert tuple(ext(torch.randn(1, 10, 32, 32))[-1].shape) == (1, 5, 256)


def test_band_list_errors() -> None:
    assert normalize_bands(None) == list(DEFAULT_BANDS)
    with pytest.raises(ValueError, match=r"more than once"):
        normalize_bands(["RED", "red"])
    with pytest.raises(ValueError, match=r"bands is empty"):
        normalize_bands([])
    with pytest.raises(ValueError, match=r"bands\[1\] = 2.5"):
        normalize_bands(["RED", 2.5])
    with pytest.raises(ValueError, match=r"interval"):
        normalize_bands([(3, 1, 2)])
    with pytest.raises(ValueError, match="must be a list of bands"):
        normalize_bands("RED")


def test_builder_argument_errors() -> None:
    with pytest.raises(TypeError, match=r"unsupported arguments \['vit_adapter'\]"):
        BACKBONE_REGISTRY.build("prithvi_eo_tiny", vit_adapter=True)
    with pytest.raises(ValueError, match="encoder_only=False"):
        BACKBONE_REGISTRY.build("prithvi_eo_tiny", encoder_only=False)
    with pytest.raises(ValueError, match="not both"):
        BACKBONE_REGISTRY.build("prithvi_eo_tiny", drop_path=0.1, drop_path_rate=0.1)
    with pytest.raises(ValueError, match="in_chans=4 disagrees"):
        BACKBONE_REGISTRY.build("prithvi_eo_tiny", in_chans=4)
    with pytest.raises(ValueError, match="no published weights"):
        BACKBONE_REGISTRY.build("prithvi_eo_tiny", pretrained=True)
    with pytest.raises(ValueError, match=r"num_frames must be an int >= 1, got .*; fix: the time steps per sample"):
        BACKBONE_REGISTRY.build("prithvi_eo_tiny", num_frames=0)
    with pytest.raises(ValueError, match="out_indices entry 9"):
        BACKBONE_REGISTRY.build("prithvi_eo_tiny", out_indices=[9])
    with pytest.warns(UserWarning, match="ignored because pretrained=False"):
        BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32, ckpt_path="/nonexistent.pt")
    assert BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32, in_chans=6).in_chans == 6


def test_out_indices_and_drop_path() -> None:
    torch.manual_seed(0)
    enc = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32, out_indices=[1, -1], drop_path=0.5)
    assert enc.out_indices == [1, 3] and enc.out_channels == [256, 256]
    assert all(isinstance(b.drop_path, DropPath) and b.drop_path.p == 0.5 for b in enc.blocks)
    x = torch.randn(4, 6, 32, 32)
    enc.eval()
    with torch.no_grad():
        a, b = enc(x), enc(x)
    assert len(a) == 2 and torch.equal(a[1], b[1])
    enc.train()
    with torch.no_grad():
        assert not torch.equal(enc(x)[1], enc(x)[1])  # stochastic depth is active while training


@pytest.mark.parametrize("name", ALL)
def test_pickle_and_deepcopy_on_meta(name: str) -> None:
    with torch.device("meta"):
        enc = BACKBONE_REGISTRY.build(name)
    for clone in (pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc)):
        assert type(clone) is PrithviViT and clone.out_channels == enc.out_channels
        assert sum(p.numel() for p in clone.parameters()) == sum(p.numel() for p in enc.parameters())
        assert "forward" not in vars(clone)


def test_pickle_and_deepcopy_real() -> None:
    torch.manual_seed(0)
    enc = build_prithvi("prithvi_eo_v2_tiny_tl", img_size=32).eval()
    x, c = torch.randn(1, 6, 32, 32), _coords(1, 1)
    ref = enc(x, **c)
    for clone in (pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc)):
        outs = clone(x, **c)
        assert all(torch.equal(a, b) for a, b in zip(ref, outs))


def test_to_empty_recomputes_position_embedding() -> None:
    real = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=48, num_frames=2)
    with torch.device("meta"):
        enc = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=48, num_frames=2)
    assert enc.pos_embed.is_meta and "pos_embed" in enc.state_dict()
    enc.to_empty(device="cpu")
    assert torch.equal(enc.pos_embed, real.pos_embed)
    enc.init_weights()
    assert torch.equal(enc.norm.weight, torch.ones(256)) and enc.cls_token.std() < 0.05
    assert torch.isfinite(enc(torch.randn(1, 6, 2, 48, 48))[-1]).all()
    # a dtype round trip rebuilds it from its definition instead of keeping a rounded copy
    enc.to(torch.bfloat16).to(torch.float32)
    assert torch.equal(enc.pos_embed, real.pos_embed)


def test_pos_embed_is_in_the_state_dict_under_its_official_name_and_loads_without_it() -> None:
    enc = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32)
    sd = enc.state_dict()
    official = {"pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"}
    assert official <= set(sd) and sd["pos_embed"].shape == (1, 1 + 4, 256)
    assert torch.equal(sd["pos_embed"], sincos_3d_pos_embed(256, (1, 2, 2)))
    other = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32)
    # round-1 state dicts have no pos_embed; files trained at another img_size have one of another grid
    without = {k: v for k, v in sd.items() if k != "pos_embed"}
    other.pos_embed.zero_()
    assert not other.load_state_dict(without, strict=True).missing_keys
    assert torch.equal(other.pos_embed, sd["pos_embed"])
    bigger = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=64).state_dict()
    other.load_state_dict({**without, "pos_embed": bigger["pos_embed"]}, strict=True)
    assert torch.equal(other.pos_embed, sd["pos_embed"])
    # a table of this grid's shape is loaded as stored, as TerraTorch does (official files hold the same values)
    other.load_state_dict({**without, "pos_embed": sd["pos_embed"] * 2}, strict=True)
    assert torch.equal(other.pos_embed, sd["pos_embed"] * 2)


def test_prepare_features_for_image_model_matches_terratorch_layout() -> None:
    enc = BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32, num_frames=2).eval()
    x = torch.randn(1, 6, 2, 32, 64)
    feats = enc(x)
    maps = enc.prepare_features_for_image_model(feats, image_size=(32, 64))
    tokens = feats[0][:, 1:].reshape(1, 2, 2, 4, 256)  # (t, h, w, d)
    assert maps[0].shape == (1, 512, 2, 4)
    assert torch.equal(maps[0][0, 256 + 7, 1, 3], tokens[0, 1, 1, 3, 7])  # time folds into channels as (t, d)
    square = enc.prepare_features_for_image_model(enc(torch.randn(1, 6, 2, 32, 32)))  # TerraTorch's square grid
    assert square[0].shape == (1, 512, 2, 2)
    with pytest.raises(ValueError, match=r"cannot arrange 16 tokens into a \(t, h, w\) grid"):
        enc.prepare_features_for_image_model(feats, image_size=(48, 48))
