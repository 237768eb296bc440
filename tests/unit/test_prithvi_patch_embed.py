"""Prithvi's patch embedding computed as a matmul over non-overlapping patches (PatchConv3d).

oneDNN's bf16 Conv3d with kernel = stride = 16, 6 input and >= 256 output channels returned values with a
relative error of ~1.1 on this CPU (torch 2.14.1); the matmul path must equal the fp32 convolution and stay
within bf16 rounding of it in bf16 and under autocast, with the official parameter names and shapes.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from encdec.models.backbones.prithvi import build_prithvi
from encdec.models.backbones.prithvi_layers import PatchConv3d, PatchEmbed3D

CASES = [(1, 1), (3, 1), (4, 2)]  # (num_frames, tubelet size)


def _conv_reference(pe: PatchEmbed3D, x: torch.Tensor) -> torch.Tensor:
    w, b = pe.proj.weight.float(), pe.proj.bias.float()
    return F.conv3d(x.float(), w, b, stride=pe.proj.stride).flatten(2).transpose(1, 2)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(("frames", "tubelet"), CASES)
def test_fp32_equals_conv3d_forward_and_backward(frames: int, tubelet: int) -> None:
    torch.manual_seed(0)
    pe = PatchEmbed3D(6, 256, (tubelet, 16, 16))
    x = torch.randn(2, 6, frames * tubelet, 32, 48, requires_grad=True)
    out = pe(x)
    ref = _conv_reference(pe, x)
    assert out.shape == ref.shape == (2, frames * 2 * 3, 256)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, pe.proj.weight, pe.proj.bias], g)
    ref_grads = torch.autograd.grad(ref, [x, pe.proj.weight, pe.proj.bias], g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("frames", "tubelet"), CASES)
def test_bf16_weights_and_autocast_within_bf16_rounding(frames: int, tubelet: int) -> None:
    torch.manual_seed(1)
    pe = PatchEmbed3D(6, 256, (tubelet, 16, 16))
    x = torch.randn(2, 6, frames * tubelet, 32, 32)
    ref = _conv_reference(pe, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = pe(x)
    assert auto.dtype == torch.bfloat16
    assert _rel(auto, ref) < 2e-2
    pe_bf16 = PatchEmbed3D(6, 256, (tubelet, 16, 16)).to(torch.bfloat16)
    pe_bf16.load_state_dict(pe.state_dict())
    assert _rel(pe_bf16(x.bfloat16()), ref) < 2e-2


def test_trailing_pixels_are_dropped_like_a_strided_conv() -> None:
    pe = PatchEmbed3D(3, 16, (1, 4, 4))
    x = torch.randn(1, 3, 1, 10, 9)
    torch.testing.assert_close(pe(x), _conv_reference(pe, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expects \[B, C, T, H, W\]"):
        pe.proj(torch.randn(3, 10, 9))


def test_keeps_official_parameter_names_meta_build_and_pickle() -> None:
    pe = PatchEmbed3D(6, 32, (2, 16, 16))
    assert isinstance(pe.proj, torch.nn.Conv3d)
    assert {k: tuple(v.shape) for k, v in pe.state_dict().items()} == {
        "proj.weight": (32, 6, 2, 16, 16),
        "proj.bias": (32,),
    }
    clone = pickle.loads(pickle.dumps(pe))
    x = torch.randn(1, 6, 2, 16, 16)
    torch.testing.assert_close(clone(x), pe(x))
    with torch.device("meta"):
        meta = PatchEmbed3D(6, 32, (1, 16, 16))
    assert meta(torch.empty(1, 6, 1, 32, 32, device="meta")).shape == (1, 4, 32)


def test_encoder_uses_the_matmul_patch_embedding_in_bf16() -> None:
    torch.manual_seed(2)
    enc = build_prithvi("prithvi_eo_tiny", num_frames=2, img_size=32)
    assert isinstance(enc.patch_embed.proj, PatchConv3d)
    x = torch.randn(1, 6, 2, 32, 32)
    ref = enc(x)[-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x)[-1]
    assert _rel(out, ref) < 3e-2
