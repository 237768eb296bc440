"""Behaviours that must be TerraTorch 1.2.11's (issue 12): padding, no-neck ViTs, UNet sizes, head dropout types,
task names, aux decoder arguments, head key names for ``--init-from``, and round-1 checkpoints without
``pos_embed``. Each expectation below is read from TerraTorch's source (``models/utils.py:pad_images``,
``pixel_wise_model.py``, ``heads/*.py``, ``decoders/unet_decoder.py``); the numeric comparison against live
TerraTorch outputs is the fixture matrix's job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encdec.models.factory import FactoryError, build_model
from encdec.models.model import AuxiliaryHead, center_crop, pad_to_patches
from encdec.models.terratorch_keys import head_key_table, rename_terratorch_head_keys
from encdec.registry import DECODER_REGISTRY
from tests.unit._tiny_encoders import TinyViT

BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
TINY = {"backbone": "prithvi_eo_tiny", "backbone_bands": BANDS, "backbone_img_size": 32}


# ---------------------------------------------------------------------------------------------- 1. padding
def test_pad_to_twice_the_patch_split_evenly_extra_pixel_at_the_end() -> None:
    x = torch.randn(2, 3, 5, 7)
    out = pad_to_patches(x, (1, 2, 2), "reflect")  # multiples of 4: H 5 -> 8 (1 + 2), W 7 -> 8 (0 + 1)
    assert torch.equal(out, F.pad(x, (0, 1, 1, 2), mode="reflect"))
    assert torch.equal(center_crop(out, (5, 7)), x)
    assert torch.equal(pad_to_patches(x, (1, 2, 2), "constant"), F.pad(x, (0, 1, 1, 2)))
    same = torch.randn(1, 3, 8, 12)
    assert pad_to_patches(same, (1, 2, 2), "reflect") is same


def test_5d_input_pads_time_with_the_temporal_patch_and_every_frame_alike() -> None:
    x = torch.randn(1, 2, 3, 5, 6)
    out = pad_to_patches(x, (2, 2, 2), "reflect")  # T 3 -> 4 at the end, H 5 -> 8, W 6 -> 8
    assert torch.equal(out, F.pad(x, (1, 1, 1, 2, 0, 1), mode="reflect"))
    frames = pad_to_patches(x, (1, 2, 2), "reflect")  # T already fits: each frame padded in H, W only
    assert frames.shape == (1, 2, 3, 8, 8)
    for t in range(3):
        assert torch.equal(frames[:, :, t], F.pad(x[:, :, t], (1, 1, 1, 2), mode="reflect"))
    with pytest.raises(ValueError, match="temporal patch size is 2 but the input"):
        pad_to_patches(torch.randn(1, 2, 5, 6), (2, 2, 2), "reflect")


def test_model_pads_centred_and_crops_the_centre_back() -> None:
    torch.manual_seed(0)
    model = build_model("segmentation", decoder="FCNDecoder", num_classes=3, decoder_channels=8,
                        necks=[{"name": "ReshapeTokensToImage"}], **TINY).eval()
    x = torch.randn(1, 6, 40, 21)  # patch 16: padded to 64 x 32 = (12 top, 12 bottom) x (5 left, 6 right)
    with torch.no_grad():
        out = model(x).output
        full = model(F.pad(x, (5, 6, 12, 12), mode="reflect")).output
    assert out.shape == (1, 3, 40, 21)
    torch.testing.assert_close(out, full[..., 12:52, 5:26], rtol=0, atol=0)


def test_padding_mode_comes_from_backbone_padding_and_none_disables_it() -> None:
    model = build_model("segmentation", decoder="FCNDecoder", num_classes=2, decoder_channels=8,
                        backbone_padding="constant", necks=[{"name": "ReshapeTokensToImage"}], **TINY)
    assert model.padding == "constant"
    with torch.no_grad():
        assert model(torch.randn(1, 6, 20, 20)).output.shape == (1, 2, 20, 20)
    off = build_model("segmentation", decoder="FCNDecoder", num_classes=2, backbone_padding=None, **TINY)
    with pytest.raises(ValueError, match=r"not a multiple of the patch size"):
        off(torch.randn(1, 6, 20, 20))
    with pytest.raises(ValueError, match=r"padding 'mirror' is not a torch padding mode"):
        build_model("segmentation", decoder="FCNDecoder", num_classes=2, backbone_padding="mirror", **TINY)


# ---------------------------------------------------------------------------------------------- 2. no necks
@pytest.mark.parametrize("bands", [BANDS, [*BANDS, "CLOUD"]])
def test_vit_without_necks_uses_prepare_features_for_image_model(bands: list[str]) -> None:
    args = {**TINY, "backbone_bands": bands}
    torch.manual_seed(0)
    plain = build_model("segmentation", decoder="FCNDecoder", num_classes=2, **args).eval()
    necked = build_model("segmentation", decoder="FCNDecoder", num_classes=2,
                         necks=[{"name": "ReshapeTokensToImage"}], **args).eval()
    necked.load_state_dict(plain.state_dict())
    x = torch.randn(1, len(bands), 64, 48)
    with torch.no_grad():
        out = plain(x).output
        torch.testing.assert_close(out, necked(x).output, rtol=0, atol=0)
    assert out.shape == (1, 2, 64, 48)


def test_vit_without_necks_and_without_prepare_features_keeps_the_clear_error() -> None:
    model = build_model("segmentation", TinyViT(in_chans=3, embed_dim=32, depth=2), "FCNDecoder", num_classes=2)
    with pytest.raises(ValueError, match=r"add the neck \{'name': 'ReshapeTokensToImage'\} first"):
        model(torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------- 3. UNet
def test_unet_output_is_the_first_level_size_as_smp_0_5() -> None:
    chans, sizes = [64, 128, 256, 512], [224, 112, 56, 28]
    decoder = DECODER_REGISTRY.build("UNetDecoder", chans, channels=[256, 128, 64, 32])
    feats = [torch.randn(1, c, s, s) for c, s in zip(chans, sizes)]
    with torch.no_grad():
        assert decoder(feats).shape == (1, 32, 224, 224)
    keys = set(decoder.state_dict())  # TerraTorch's layout: decoder.decoder.blocks.<i>.conv1.0 (conv), .1 (norm)
    assert {"decoder.blocks.0.conv1.0.weight", "decoder.blocks.3.conv2.1.running_var"} <= keys
    assert "decoder.blocks.0.conv1.0.bias" not in keys  # no bias before a batch norm, as smp's Conv2dReLU
    assert DECODER_REGISTRY.build("UNetDecoder", chans, channels=[8] * 4, use_batchnorm=False).norm == "none"
    with pytest.raises(ValueError, match=r"attention_type='scse' is not supported"):
        DECODER_REGISTRY.build("UNetDecoder", chans, channels=[8] * 4, attention_type="scse")


# ---------------------------------------------------------------------------------------------- 4. dropout
def _channel_pattern(dropout: nn.Module, channels: int = 64) -> tuple[bool, bool]:
    """(some channel is partly zeroed, every channel is all-or-nothing) for ones through ``dropout`` in train."""
    torch.manual_seed(0)
    out = dropout.train()(torch.ones(2, channels, 8, 8))
    zero = (out == 0).flatten(2)
    mixed = bool((zero.any(-1) & ~zero.all(-1)).any())
    return mixed, bool((zero.all(-1) | ~zero.any(-1)).all())


def test_head_dropout_is_element_wise_except_in_the_regression_head() -> None:
    common = {"decoder": "FCNDecoder", "decoder_channels": 64, "head_dropout": 0.5,
              "necks": [{"name": "ReshapeTokensToImage"}], **TINY}
    aux = [AuxiliaryHead("aux", "FCNDecoder", {"decoder_channels": 64, "head_dropout": 0.5})]
    seg = build_model("segmentation", num_classes=2, aux_decoders=aux, **common)
    for head in (seg.head, seg.aux_heads["aux"].head):
        mixed, _ = _channel_pattern(head.dropout)
        assert mixed, "segmentation heads drop single elements (nn.Dropout), not whole channels"
    reg = build_model("regression", aux_decoders=aux, **common)
    for head in (reg.head, reg.aux_heads["aux"].head):
        mixed, whole = _channel_pattern(head.dropout)
        assert whole and not mixed, "the regression head drops whole channels (nn.Dropout2d)"
    cls = build_model("classification", num_classes=3, **common)
    out = cls.head.dropout.train()(torch.ones(4, 64))
    assert ((out == 0).sum(1) > 0).all() and ((out != 0).sum(1) > 0).all()  # element-wise on [B, C]
    with torch.no_grad():  # eval mode: no dropout anywhere
        x = torch.randn(1, 6, 32, 32)
        assert torch.equal(seg.eval()(x).output, seg(x).output)


def test_scalar_head_applies_its_mlp_per_pixel_then_averages_like_terratorch() -> None:
    from encdec.models.heads import ClassificationHead

    torch.manual_seed(0)
    head = ClassificationHead(8, 3, dim_list=[5]).eval()
    x = torch.randn(2, 8, 4, 4)
    tokens = x.flatten(2).transpose(1, 2)
    expected = head.final(torch.relu(head.hidden[0](tokens))).mean(1)
    torch.testing.assert_close(head(x), expected)
    pooled = ClassificationHead(8, 3, dim_list=[5], linear_after_pool=True).eval()
    pooled.load_state_dict(head.state_dict())
    torch.testing.assert_close(pooled(x), pooled.final(torch.relu(pooled.hidden[0](x.mean((2, 3))))))


# ---------------------------------------------------------------------------------------------- 5, 7
def test_task_names_are_case_insensitive() -> None:
    model = build_model("Segmentation", decoder="FCNDecoder", num_classes=2, **TINY)
    assert model.task == "segmentation"
    assert build_model("SCALAR_REGRESSION", decoder="FCNDecoder", **TINY).task == "scalar_regression"
    with pytest.raises(FactoryError, match=r"task 'segment' is not supported"):
        build_model("segment", decoder="FCNDecoder", num_classes=2, **TINY)


def test_unknown_decoder_arguments_are_named_with_did_you_mean_for_main_and_aux_decoders() -> None:
    with pytest.raises(FactoryError, match=r"aux decoder 'aux' 'FCNDecoder' does not take the argument\(s\) 'bogus'"):
        build_model("segmentation", decoder="FCNDecoder", num_classes=2,
                    aux_decoders=[AuxiliaryHead("aux", "FCNDecoder", {"bogus": 1})], **TINY)
    with pytest.raises(FactoryError, match=r"'chanels' \(did you mean 'channels'\?\)"):
        build_model("segmentation", decoder="FCNDecoder", num_classes=2,
                    aux_decoders=[{"name": "aux", "decoder": "FCNDecoder", "decoder_args": {"decoder_chanels": 8}}],
                    **TINY)
    with pytest.raises(FactoryError, match=r"decoder 'UperNetDecoder' does not take .*'chanels' \(did you mean"):
        build_model("segmentation", decoder="UperNetDecoder", num_classes=2, decoder_chanels=8, **TINY)
    with pytest.raises(FactoryError, match=r"unused arguments \['num_clases'\] 'num_clases' \(did you mean 'num_classes'"):
        build_model("segmentation", decoder="FCNDecoder", num_clases=2, **TINY)


def test_num_outputs_is_terratorch_s_name_for_regression_outputs() -> None:
    model = build_model("regression", decoder="FCNDecoder", num_outputs=3, **TINY)
    assert model.head.final.out_channels == 3
    with pytest.raises(FactoryError, match=r"num_outputs=3 and num_classes=3 are both given"):
        build_model("regression", decoder="FCNDecoder", num_outputs=3, num_classes=3, **TINY)


# ---------------------------------------------------------------------------------------------- 9. head keys
def test_terratorch_head_keys_map_channel_list_blocks_and_pixel_shuffle() -> None:
    seg = build_model("segmentation", decoder="FCNDecoder", num_classes=2, head_channel_list=[16, 8],
                      aux_decoders=[AuxiliaryHead("aux", "FCNDecoder", {"head_channel_list": [4]})], **TINY)
    table = head_key_table(seg)
    # TerraTorch: head.head = [Sequential(Sequential(Conv2d, ReLU), ...), dropout, Conv2d]
    assert table["head.head.0.0.0.weight"] == "head.hidden.0.weight"
    assert table["head.head.0.1.0.bias"] == "head.hidden.3.bias"
    assert table["head.head.2.weight"] == "head.final.weight"
    assert table["aux_heads.aux.1.head.0.0.0.weight"] == "aux_heads.aux.head.hidden.0.weight"
    reg = build_model("regression", decoder="FCNDecoder", head_learned_upscale_layers=2, head_channel_list=[8], **TINY)
    table = head_key_table(reg)
    # TerraTorch: head.head = [Sequential(PixelShuffleUpscale x2), Sequential(Conv2d, BatchNorm2d, ReLU), Dropout2d, Conv2d]
    assert table["head.head.0.1.conv.weight"] == "head.upscale.1.conv.weight"
    assert table["head.head.0.0.bn.running_mean"] == "head.upscale.0.bn.running_mean"
    assert table["head.head.1.0.0.weight"] == "head.hidden.0.weight"
    assert table["head.head.1.0.1.running_var"] == "head.hidden.1.running_var"
    assert table["head.head.3.bias"] == "head.final.bias"
    only_up = head_key_table(build_model("regression", decoder="FCNDecoder", head_learned_upscale_layers=1, **TINY))
    assert only_up["head.head.2.weight"] == "head.final.weight"  # no pre_head entry without channel_list
    # the renamed TerraTorch state dict loads strictly; renaming is idempotent
    ours = reg.state_dict()
    tt = {"model." + k: ours[v].clone() + 1 for k, v in table.items()}
    renamed = rename_terratorch_head_keys(tt, reg)
    assert set(renamed) == set(table.values()) and rename_terratorch_head_keys(renamed, reg) == renamed
    assert reg.head.upscale[0].conv.weight.shape == (4 * 256, 256, 3, 3)  # conv to 4C, then PixelShuffle(2)
    with torch.no_grad():
        assert reg(torch.randn(1, 6, 32, 32)).output.shape == (1, 32, 32)


# ---------------------------------------------------------------------------------------------- 8. round 1
def test_round1_dcp_checkpoint_without_pos_embed_resumes(tmp_path: Path) -> None:
    from encdec.distributed import make_strategy
    from encdec.train.optim import build_optimizer

    def strategy(seed: int) -> Any:
        torch.manual_seed(seed)
        model = build_model("segmentation", decoder="FCNDecoder", num_classes=2, decoder_channels=8,
                            necks=[{"name": "ReshapeTokensToImage"}], **TINY)
        s = make_strategy("none", optimizer_factory=build_optimizer)
        s.setup(model, {"name": "adamw", "lr": 1e-3}, precision="fp32", grad_accum=1, activation_checkpointing=False)
        return s

    old = strategy(0)
    old.module.encoder._non_persistent_buffers_set.add("pos_embed")  # what round 1 wrote: no pos_embed
    assert "encoder.pos_embed" not in old.module.state_dict()
    old.save(tmp_path / "step_1", {"step": 1})
    new = strategy(1)
    assert new.load(tmp_path / "step_1")["step"] == 1
    assert torch.equal(new.module.encoder.pos_embed, old.module.encoder.pos_embed)
    assert torch.equal(new.module.head.final.weight, old.module.head.final.weight)


def test_backbone_patch_size_sets_the_tubelet_and_time_is_padded_to_it() -> None:
    model = build_model("segmentation", decoder="FCNDecoder", num_classes=2, decoder_channels=8,
                        backbone_patch_size=[2, 16, 16], backbone_num_frames=4,
                        necks=[{"name": "ReshapeTokensToImage", "effective_time_dim": 2}], **TINY).eval()
    assert model.encoder.patch_size == (2, 16, 16)
    with torch.no_grad():  # T 3 -> 4 (reflect at the end), H/W 20 -> 32
        assert model(torch.randn(1, 6, 3, 20, 20)).output.shape == (1, 2, 20, 20)
