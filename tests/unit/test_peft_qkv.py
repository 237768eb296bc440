"""The qkv split: QKVSep equals the fused layer, builds on meta, loads fused state dicts (also under peft)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import encdec.models  # noqa: F401  (registers the backbones)
from encdec.models.peft import PeftConfigError, QKVSep, replace_qkv
from encdec.registry import BACKBONE_REGISTRY


def _fused(dim: int = 32, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(dim, 3 * dim, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_split_matches_fused(bias: bool) -> None:
    fused = _fused(bias=bias)
    sep = QKVSep.from_linear(fused)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(sep(x), fused(x), atol=1e-6, rtol=0)
    # copies, not views: the fused storage can be freed and the parts step independently
    assert sep.q_linear.weight.data_ptr() != fused.weight.data_ptr()
    torch.testing.assert_close(sep.fuse().weight, fused.weight, atol=0, rtol=0)


def test_split_rejects_non_qkv_linear() -> None:
    with pytest.raises(ValueError, match=r"Linear\(D, 3D\).*Linear\(8, 16\)"):
        QKVSep.from_linear(nn.Linear(8, 16))


def test_split_on_meta() -> None:
    with torch.device("meta"):
        sep = QKVSep.from_linear(nn.Linear(16, 48))
        out = sep(torch.empty(2, 5, 16))
    assert sep.k_linear.weight.is_meta and out.shape == (2, 5, 48) and out.is_meta


def test_fused_state_dict_loads_into_split() -> None:
    fused = _fused()
    holder = nn.Module()
    holder.qkv = QKVSep(32)
    result = holder.load_state_dict({f"qkv.{k}": v for k, v in fused.state_dict().items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for i, part in enumerate(holder.qkv.parts()):
        torch.testing.assert_close(part.weight, fused.weight[32 * i : 32 * (i + 1)], atol=0, rtol=0)
        torch.testing.assert_close(part.bias, fused.bias[32 * i : 32 * (i + 1)], atol=0, rtol=0)


def test_fused_state_dict_loads_under_peft_wrapper() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    fused = _fused()
    holder = nn.Module()
    holder.qkv = QKVSep(32)
    inject_adapter_in_model(LoraConfig(target_modules=["qkv.q_linear"], r=2), holder)
    assert "qkv.q_linear.base_layer.weight" in holder.state_dict()
    result = holder.load_state_dict({f"qkv.{k}": v for k, v in fused.state_dict().items()}, strict=False)
    assert not result.unexpected_keys
    assert all("lora_" in k for k in result.missing_keys) and result.missing_keys
    torch.testing.assert_close(holder.qkv.q_linear.base_layer.weight, fused.weight[:32], atol=0, rtol=0)
    torch.testing.assert_close(holder.qkv.v_linear.bias, fused.bias[64:], atol=0, rtol=0)


def test_fused_state_dict_of_wrong_size_is_an_error() -> None:
    holder = nn.Module()
    holder.qkv = QKVSep(32)
    with pytest.raises(RuntimeError, match=r"qkv.weight.*cannot be split"):
        holder.load_state_dict({"qkv.weight": torch.zeros(90, 32), "qkv.bias": torch.zeros(96)}, strict=False)


def test_fused_and_split_keys_together_are_an_error() -> None:
    holder = nn.Module()
    holder.qkv = QKVSep(4)
    sd = {"qkv.weight": torch.zeros(12, 4), "qkv.q_linear.weight": torch.zeros(4, 4)}
    with pytest.raises(RuntimeError, match=r"both the fused qkv\.weight and the split qkv\.q_linear\.weight"):
        holder.load_state_dict(sd, strict=False)


@pytest.fixture(scope="module")
def tiny_prithvi() -> nn.Module:
    torch.manual_seed(0)
    return BACKBONE_REGISTRY.build("prithvi_eo_tiny", img_size=32).eval()


def test_replace_qkv_on_prithvi_keeps_outputs(tiny_prithvi: nn.Module) -> None:
    enc = copy.deepcopy(tiny_prithvi)
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        ref = tiny_prithvi(x)
        names = replace_qkv(enc, "qkv")
        out = enc(x)
    assert names == [f"blocks.{i}.attn.qkv" for i in range(4)]
    assert all(isinstance(b.attn.qkv, QKVSep) for b in enc.blocks)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    clone = pickle.loads(pickle.dumps(enc))
    with torch.no_grad():
        torch.testing.assert_close(clone(x)[-1], out[-1], atol=0, rtol=0)


def test_replace_qkv_errors(tiny_prithvi: nn.Module) -> None:
    enc = copy.deepcopy(tiny_prithvi)
    with pytest.raises(PeftConfigError, match=r"'qkvz' matches no module.*blocks\.0\.attn\.qkv"):
        replace_qkv(enc, "qkvz")
    with pytest.raises(PeftConfigError, match=r"matches blocks\.0\.attn, a Attention"):
        replace_qkv(enc, "attn")
    replace_qkv(enc, "qkv")
    with pytest.raises(PeftConfigError, match=r"blocks\.0\.attn\.qkv is already split"):
        replace_qkv(enc, "attn.qkv")
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with pytest.raises(PeftConfigError, match=r"'0' matches 0, a Linear\(8, 8\)"):
        replace_qkv(plain, "0")
    with pytest.raises(PeftConfigError, match=r"no fused Linear.*set replace_qkv to null"):
        replace_qkv(plain, "qkv")
